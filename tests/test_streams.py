"""Streams (layerwise/streams.py): extra inputs carried through the blocks beside the data.

A toy stream maker (``flip``: the input negated, and the input with its label written in) and a
toy objective that reads both streams and runs its block on another input (``ctx.block``) prove
the contract on tiny float64 networks: one forward per stream and batch, the routing rules on
every stream, block access with gradients, the prediction hook in evaluation, and clear errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import layerwise as lw
from layerwise.errors import LayerwiseError, RecipeError
from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.objectives.base import Objective
from layerwise.streams import StreamMaker
from layerwise.testing import check_objective, check_routing, use_plugin
from layerwise.trainer import Trainer, evaluate

INPUT_SHAPE = (1, 4, 4)
NUM_CLASSES = 10


@dataclass
class FlipConfig:
    """Options of the toy maker."""

    scale: float = 1.0
    predict_by: str = "head"

    def __post_build__(self, path, problems):
        if self.scale <= 0:
            problems.add(f"{path}.scale", f"must be > 0, found {self.scale}")


class Flip(StreamMaker):
    """Two streams: ``neg`` (the input negated) and ``lab`` (the input with its label written in)."""

    name = "flip"
    Config = FlipConfig
    names = ("neg", "lab")
    made = 0

    def make(self, x, y, network):
        Flip.made += 1
        lab = x.clone().flatten(1)
        lab[:, :NUM_CLASSES] = nn.functional.one_hot(y, NUM_CLASSES).to(x.dtype) * self.config.scale
        return {"neg": -x, "lab": lab.view_as(x)}

    def predict(self, network, x):
        if self.config.predict_by == "head":
            return None
        return torch.full((x.shape[0], NUM_CLASSES), 0.0, dtype=x.dtype, device=x.device).index_fill_(
            1, torch.tensor([3], device=x.device), 1.0)  # always class 3: visibly not the head


class Contrast(Objective):
    """Reads both streams, and its block on twice the block input (block access)."""

    name = "contrast"
    streams = Flip

    def loss(self, z, ctx):
        again = ctx.block(2 * ctx.block_input)
        loss = (ctx.streams["lab"].pow(2).mean() - ctx.streams["neg"].pow(2).mean()).pow(2) + again.mean().pow(2)
        return loss, {"loss": loss.detach()}


class OldStyle(Objective):
    """An objective written against the old contract: it ignores ctx.streams and ctx.block."""

    name = "oldstyle"

    def __init__(self, config, info):
        super().__init__(config, info)
        self.proj = nn.Linear(info.out_shape[0], info.num_classes)

    def loss(self, z, ctx):
        loss = nn.functional.cross_entropy(self.proj(z), ctx.y)
        return loss, {"loss": loss.detach()}


class Plugin:
    @staticmethod
    @lw.hookimpl
    def layerwise_register_streams(registry):
        registry.register(Flip.name, Flip)

    @staticmethod
    @lw.hookimpl
    def layerwise_register_objectives(registry):
        registry.register(Contrast.name, Contrast)
        registry.register(OldStyle.name, OldStyle)


@pytest.fixture(autouse=True)
def plugin():
    with use_plugin(Plugin, name="streams-test"):
        yield


def recipe(blocks, streams=None):
    model = {"subnetworks": [{"name": "s", "blocks": blocks}]}
    if streams is not None:
        model["streams"] = streams
    return {"name": "streams", "data": {"dataset": "mnist"}, "model": model, "train": {"device": "cpu"},
            "optim": {"local": {"name": "adam", "lr": 1e-2}, "global": {"name": "adam", "lr": 1e-2}}}


def blk(name, objective="none", **extra):
    return {"name": name, "layer": "linear", "out": 12, "act": "tanh", "objective": objective, **extra}


HYBRID = [blk("bp0"), blk("c1", "contrast"), blk("bp2"), blk("c3", "contrast"),
          {"name": "head", "layer": "linear", "out": NUM_CLASSES}]


def build(blocks=HYBRID, streams=None, seed=0, group=None):
    parsed = parse_recipe(recipe(blocks, streams), "streams.yaml")
    torch.manual_seed(seed)
    graph = network_from_recipe(parsed, INPUT_SHAPE, NUM_CLASSES).double()
    return graph, Trainer.from_recipe(graph, parsed, group=group), parsed


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, *INPUT_SHAPE, dtype=torch.float64, generator=g), torch.arange(12) % NUM_CLASSES


def test_an_objective_that_reads_streams_gets_its_maker_by_default():
    graph, _, parsed = build()
    assert parsed.model.streams == {"name": "flip"}  # filled in, so the resolved recipe says it
    assert isinstance(graph.stream_maker, Flip)


def test_one_forward_per_stream_and_batch():
    graph, trainer, _ = build()
    calls = {name: 0 for name in graph.order}
    for name in graph.order:
        graph.blocks[name].body.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    made = Flip.made
    trainer.step(*batch())
    assert Flip.made == made + 1
    # data + 2 streams, and each contrast block runs itself once more on its own input (block access)
    assert calls == {"bp0": 3, "c1": 4, "bp2": 3, "c3": 4, "head": 3}


@pytest.mark.parametrize("blocks", [HYBRID, [blk("c0", "contrast"), blk("bp1", detach=True), blk("c2", "contrast"),
                                             {"name": "head", "layer": "linear", "out": NUM_CLASSES}]],
                         ids=["hybrid", "detach"])
def test_routing_holds_on_every_stream(blocks):
    graph, trainer, _ = build(blocks)
    x, y = batch()
    made = graph.make_streams(x, y)
    trainer.compute_gradients(x, y, streams=made)
    check_routing(graph, x, y, made)
    # and the streams did reach the local losses: without them the gradients would differ
    local = graph.blocks["c1" if "c1" in graph.blocks else "c0"]
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in local.parameters())


def test_a_stream_loss_reaches_its_own_block_only():
    graph, _, _ = build()
    x, y = batch()
    out = graph.run(x, streams=graph.make_streams(x, y))
    loss = out.streams["lab"]["c3"].pow(2).sum()
    earlier = [p for name in ("bp0", "c1", "bp2") for p in graph.blocks[name].parameters()]
    grads = torch.autograd.grad(loss, earlier, allow_unused=True)
    assert all(g is None for g in grads)  # streams enter every block detached
    own = torch.autograd.grad(loss, list(graph.blocks["c3"].body.parameters()))
    assert all(g.abs().max() > 0 for g in own)


def test_the_global_loss_reads_the_data_stream_only():
    graph, trainer, _ = build([blk("bp0"), {"name": "head", "layer": "linear", "out": NUM_CLASSES}], {"name": "flip"})
    x, y = batch()
    trainer.compute_gradients(x, y)
    expected = torch.autograd.grad(nn.functional.cross_entropy(graph(x), y), list(graph.blocks["bp0"].parameters()))
    for p, want in zip(graph.blocks["bp0"].parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want)


def test_check_objective_covers_streams_and_block_access():
    metrics = check_objective("contrast", plugin="streams-test", widths=(16, 12, 8))
    assert set(metrics) == {"loss"}


def test_the_prediction_hook_is_what_evaluate_uses():
    graph, trainer, _ = build(streams={"name": "flip", "predict_by": "constant"})
    x, y = batch()
    assert graph(x).argmax(1).eq(3).all()
    result = evaluate(graph, [(x, y)])
    assert result["acc"] == pytest.approx(float((y == 3).double().mean()))
    head, _, _ = build(streams={"name": "flip"})
    torch.testing.assert_close(head(x), head.run(x).logits)  # predict() returned None: the head's logits


def test_an_old_contract_objective_trains_beside_streams():
    blocks = [blk("old", "oldstyle"), blk("c1", "contrast"), {"name": "head", "layer": "linear", "out": NUM_CLASSES}]
    graph, trainer, _ = build(blocks)
    x, y = batch()
    before = [p.detach().clone() for p in graph.blocks["old"].parameters()]
    for _ in range(3):
        trainer.step(x, y)
    assert all(not torch.equal(b, p) for b, p in zip(before, graph.blocks["old"].parameters(), strict=True))
    check_objective("oldstyle", plugin="streams-test", widths=(16, 16, 16))


@pytest.mark.parametrize(("streams", "message"), [
    ({"name": "filp"}, r"model\.streams\.name: unknown stream maker 'filp' \(did you mean 'flip'\?\)"),
    ({"name": "flip", "scale": 0}, r"model\.streams\.scale: must be > 0, found 0"),
    ({"name": "flip", "scael": 2}, r"model\.streams\.scael: unknown key \(did you mean 'scale'\?\)"),
])
def test_bad_streams_are_recipe_errors_with_key_paths(streams, message):
    with pytest.raises(RecipeError, match=message):
        build(streams=streams)


def test_a_maker_that_breaks_its_contract_is_named():
    graph, trainer, _ = build()
    graph.stream_maker.make = lambda x, y, network: {"neg": x}
    with pytest.raises(LayerwiseError, match=r"stream maker 'flip': make\(\) must return a dict with the streams"):
        trainer.step(*batch())


# Run by torchrun in each rank: its half of the batch through the real trainer, its gradients to a file.
RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from layerwise.distributed import Group
from layerwise.testing import use_plugin
from tests.helpers import gradients
from tests.test_streams import Plugin, batch, build

dist.init_process_group("gloo")
group = Group(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
with use_plugin(Plugin, name="streams-test"):
    graph, trainer, _ = build(group=group)
    x, y = (t.tensor_split(group.world)[group.rank] for t in batch())
    trainer.compute_gradients(x, y)
torch.save(gradients(graph), f"{sys.argv[1]}/rank{group.rank}.pt")
dist.destroy_process_group()
"""


def test_two_ranks_compute_the_stream_gradients_of_one_process(tmp_path):
    """Data parallelism with streams and block access: each rank makes the streams of its half of
    the batch, the local losses see every rank's stream outputs, and ``ctx.block`` runs on each
    rank's share only (run whole on every rank, its gradient would be counted twice in the sum)."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, gradients

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    graph, trainer, _ = build()
    trainer.compute_gradients(*batch())
    expected = gradients(graph)
    assert {"blocks.c1.body.0.weight", "blocks.c3.body.0.weight"} <= set(expected)  # the stream-reading blocks
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_pipelines_refuse_streams():
    from layerwise.pipeline import check_pipeline_recipe

    _, _, parsed = build()
    with pytest.raises(LayerwiseError, match="model.streams cannot run in 2 pipeline stages"):
        check_pipeline_recipe(parsed, 2)
