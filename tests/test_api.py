"""The Python API (docs/python.md): networks of your own modules, lw.split, save and load,
and the same clear errors as from YAML."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import layerwise as lw
from layerwise.errors import CheckpointError, LayerwiseError, RecipeError
from layerwise.factory import parse_recipe
from layerwise.testing import check_routing
from tests.helpers import tiny_recipe


def small_network(objective=None, width=8):
    return lw.Network([
        lw.Block("conv", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
                 objective=objective or lw.objective("nhsic", sigma=5, beta=10)),
        lw.Block("fc", nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU())),
        lw.Block("head", nn.LazyLinear(3)),
    ])


def tensors(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.arange(n) % 3


def test_a_python_network_trains_from_a_dataloader_and_evaluates():
    torch.manual_seed(0)
    net = small_network()
    trainer = lw.Trainer(net, local_optim={"name": "adam", "lr": 1e-2}, global_optim={"name": "sgd", "lr": 0.1})
    loader = DataLoader(TensorDataset(*tensors()), batch_size=8)
    assert not net.materialized
    before = None
    for _ in range(3):
        summary = trainer.train_epoch(loader)
        before = before or summary["global_loss"]
    assert net.materialized and net.num_classes == 3 and net.shapes["fc"] == (8,)
    assert set(summary["blocks"]) == {"conv"} and {"hsic_zx", "hsic_zy", "loss"} <= set(summary["blocks"]["conv"])
    assert summary["global_loss"] < before
    accuracy = lw.evaluate(net, loader)
    assert list(accuracy) == [0.0] and 0.0 <= accuracy[0.0] <= 1.0
    assert net(tensors()[0]).shape == (24, 3)


def test_objective_options_give_the_recipe_messages():
    with pytest.raises(RecipeError) as from_yaml:
        data = tiny_recipe()
        data["model"]["subnetworks"][0]["blocks"][0]["objective"]["sigma"] = "abc"
        parse_recipe(data, "r.yaml")
    with pytest.raises(RecipeError) as from_python:
        lw.objective("nhsic", sigma="abc", beta=100)
    # the same problem, keyed by the option's path
    assert from_yaml.value.problems[0].split("objective.")[-1] == from_python.value.problems[0].split("objective.")[-1]
    assert str(from_python.value) == "objective('nhsic'): objective.sigma: expected a number, found 'abc' (str)"
    with pytest.raises(RecipeError, match=r"objective\.sigmaa: unknown key \(did you mean 'sigma'\?\)"):
        lw.objective("nhsic", sigmaa=1)
    with pytest.raises(RecipeError, match=r"unknown objective 'nhsci' \(did you mean 'nhsic'\?\)"):
        lw.objective("nhsci")


@pytest.mark.parametrize("make, message", [
    (lambda: lw.Network([lw.Block("a", nn.Linear(4, 3), inputs=["zz"])]), r"block 'a': inputs: unknown block 'zz'"),
    (lambda: lw.Network([lw.Block("a", nn.Linear(4, 5)), lw.Block("b", nn.Linear(6, 3))], input_shape=(4,)),
     r"block 'b': cannot take an input of shape \(5,\)"),
    (lambda: lw.Network([lw.Block("a", nn.Linear(4, 3)), lw.Block("a", nn.Linear(3, 3))]), "used twice"),
    (lambda: lw.Network([lw.Block("input", nn.Linear(4, 3))]), "'input' is reserved"),
    (lambda: lw.Block("a", nn.Linear), "expected an nn.Module instance"),
    (lambda: lw.Block("a", nn.Linear(4, 3), objective="nhsic"), r"objective must come from layerwise.objective"),
    (lambda: lw.Network([lw.Block("a", nn.Linear(4, 7))], input_shape=(4,), num_classes=3),
     r"outputs shape \(7,\), but the dataset has 3 classes"),
    (lambda: lw.split(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)), at=["2"]), r"at: no submodule '2'"),
    (lambda: lw.Trainer(small_network(), local_optim={"name": "adam", "lr": "abc"}),
     r"Trainer: local_optim\.lr: expected a number, found 'abc'"),
])
def test_bad_input_from_python_is_a_layerwise_error(make, message):
    with pytest.raises(LayerwiseError, match=message):
        make()


def test_save_and_load_weights_into_a_fresh_instance(tmp_path):
    torch.manual_seed(0)
    net = small_network()
    lw.Trainer(net).train_epoch([tensors()])
    path = lw.save(net, tmp_path / "net.safetensors")
    torch.manual_seed(1)
    fresh = lw.load_weights(small_network(), path)  # materialised from the saved input shape
    x = tensors(seed=5)[0]
    net.eval(), fresh.eval()
    assert torch.equal(net(x), fresh(x))
    with pytest.raises(CheckpointError, match=r"does not match the network: .*blocks\.fc\.body\.1\.weight has shape "
                                              r"\(8, 144\), the network needs \(9, 144\)"):
        lw.load_weights(small_network(width=9), path)
    with pytest.raises(CheckpointError, match=r"block 'conv' was trained by 'nhsic', here it has 'none'"):
        other = small_network()
        other.blocks["conv"].spec = lw.Block("x", nn.ReLU()).spec
        lw.load_weights(other, path)
    with pytest.raises(CheckpointError, match=r"holds a network built in Python.*lw|layerwise\.load_weights"):
        lw.load_model(path)
    with pytest.raises(LayerwiseError, match="has not seen an input yet"):
        lw.save(small_network(), tmp_path / "empty.safetensors")


def test_a_recipe_model_saved_from_python_reloads_by_itself(tmp_path):
    recipe = parse_recipe(tiny_recipe(), "tiny")
    model = lw.build_model(recipe)
    again = lw.build_model(recipe).state_dict()  # seeded by the recipe, so the same weights
    assert all(torch.equal(value, again[key]) for key, value in model.state_dict().items())
    path = lw.save(model, tmp_path / "m.safetensors")
    x = torch.randn(5, 1, 28, 28)
    model.eval()
    assert torch.equal(lw.load_model(path)(x), model(x))


def test_split_resnet18_into_local_stages_routes_each_loss_to_its_stage():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    net = lw.split(model, at=["layer1", "layer2", "layer3"], objective=lw.objective("nhsic", sigma=5, beta=10),
                   input_shape=(3, 32, 32))
    assert list(net.blocks) == ["layer1", "layer2", "layer3", "head"]
    assert net.shapes["layer1"] == (64, 8, 8) and net.shapes["layer3"] == (256, 2, 2) and net.shapes["head"] == (10,)
    assert [b.name for b in net.local_blocks()] == ["layer1", "layer2", "layer3"]
    # the stages hold the model's own modules: no weight is copied
    assert net.blocks["layer2"].body.layer2 is model.layer2
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=g), torch.arange(8) % 10
    trainer = lw.Trainer(net)
    trainer.compute_gradients(x, y)
    check_routing(net, x, y)  # every .grad equals autograd.grad of its stage's own loss
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer.step(x, y)
    changed = {k.split(".")[1] for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"layer1", "layer2", "layer3", "head"}


def test_split_refuses_a_cut_that_a_skip_connection_crosses():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.b(self.a(x)) + x)

    with pytest.raises(LayerwiseError, match=r"stage 1 would need 2 inputs"):
        lw.split(Skip(), at=["a"])


SNIPPET_RECIPE = {
    "name": "conv_snippet",
    "seed": 0,
    "data": {"dataset": "mnist", "batch_size": 256, "train_limit": 2048},
    "model": {"subnetworks": [{"name": "sn1", "blocks": [
        {"name": "conv1", "layer": "conv2d", "out": 32, "padding": 1, "act": "relu",
         "objective": {"name": "nhsic", "sigma": 10, "beta": 100}},
        {"name": "head", "layer": "linear", "out": 10},
    ]}]},
    "optim": {"local": {"name": "adam", "lr": 1e-3}, "global": {"name": "adam", "lr": 1e-3}},
    "train": {"epochs": 1, "device": "cpu"},
}


@pytest.mark.integration
def test_the_python_snippet_and_its_recipe_train_the_same_weights(tmp_path, mnist_available):
    """docs/python.md's network written in Python and as a recipe: same seed, same batches
    (lw.batches numbers epochs as `layerwise train` does), so the same weights after an epoch."""
    from layerwise.checkpoint import load_checkpoint

    run = lw.train(parse_recipe(SNIPPET_RECIPE, "snippet"), runs_dir=tmp_path / "runs")
    assert [r["epoch"] for r in run.metrics] == [1] and 0.0 < run.final["test_acc"] <= 1.0
    torch.manual_seed(0)
    net = lw.Network([
        lw.Block("conv1", nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()),
                 objective=lw.objective("nhsic", sigma=10, beta=100)),
        lw.Block("head", nn.Sequential(nn.Flatten(), nn.LazyLinear(10))),
    ])
    trainer = lw.Trainer(net, local_optim={"name": "adam", "lr": 1e-3}, global_optim={"name": "adam", "lr": 1e-3})
    trainer.train_epoch(lw.batches("mnist", batch_size=256, seed=0, limit=2048))
    saved = load_checkpoint(run.path).tensors
    mine = net.state_dict()
    assert set(saved) == set(mine)
    for key, value in saved.items():
        assert torch.equal(mine[key], value), f"{key} differs"
    assert lw.evaluate(net, "mnist") == lw.evaluate(lw.load_model(run.path), "mnist") == {0.0: run.final["test_acc"]}


def test_a_recipe_block_copied_without_validation_still_gets_its_objective_config():
    import dataclasses

    from layerwise.factory import network_from_recipe

    recipe = parse_recipe(tiny_recipe(), "tiny")
    sub = recipe.model.subnetworks[0]
    sub.blocks[0] = dataclasses.replace(sub.blocks[0], objective={"name": "nhsic", "sigma": 7})
    assert sub.blocks[0].objective_config is None  # dataclasses.replace skips the derived field
    assert network_from_recipe(recipe).blocks["hsic1"].objective.config.sigma == 7
    sub.blocks[0] = dataclasses.replace(sub.blocks[0], objective={"name": "nhsic", "sigma": "x"})
    with pytest.raises(RecipeError, match=r"blocks\[0\]\.objective\.sigma: expected a number"):
        network_from_recipe(recipe)


@pytest.mark.integration
def test_epoch_callbacks_see_each_saved_epoch_and_can_stop_training(tmp_path, mnist_available):
    from layerwise.runs import read_metrics
    from layerwise.train_run import train_recipe

    seen = []

    def stop_after_two(run, record):
        seen.append((run, record["epoch"], (run / "model.safetensors").exists()))
        if record["epoch"] == 2:
            raise KeyError("enough")

    recipe = parse_recipe(tiny_recipe(train_limit=256), "tiny", ["train.epochs=3"])
    with pytest.raises(KeyError, match="enough"):
        train_recipe(recipe, tmp_path / "runs", show_progress=False, quiet=True, callbacks=[stop_after_two])
    run = seen[0][0]
    assert [(epoch, saved) for _, epoch, saved in seen] == [(1, True), (2, True)]
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
