"""Faults from the adversarial review that live in the core: an untrusted checkpoint's recipe
asking for huge layers, huge batches, bad --device values, NaNs blamed on the right setting,
and eval's own input checks. Each test failed before its fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from layerwise.checkpoint import model_from_checkpoint, save_checkpoint
from layerwise.errors import CheckpointError, LayerwiseError, NonFiniteError
from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.trainer import Trainer, out_of_memory_message, resolve_device
from tests.helpers import REPO, tiny_recipe


def saved_tiny(tmp_path, **changes):
    recipe = parse_recipe(tiny_recipe(), "tiny")
    torch.manual_seed(0)
    graph = network_from_recipe(recipe)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, graph, recipe, 1, {})
    return path


def test_a_checkpoint_whose_recipe_asks_for_huge_layers_is_refused_before_allocating(tmp_path):
    """The embedded recipe widens a block to 1,000,000 units (4.6 GB of weights in the review);
    the file holds the small tensors. Checked on the meta device, so nothing big is allocated:
    the child process runs under a 1.5 GiB address-space cap and must still answer in one line."""
    path = saved_tiny(tmp_path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    recipe = json.loads(metadata["layerwise.recipe"])
    recipe["model"]["subnetworks"][0]["blocks"][0]["out"] = 1_000_000
    metadata["layerwise.recipe"] = json.dumps(recipe)
    del metadata["layerwise.sha256"]  # a stranger's file need not carry our digest
    bomb = tmp_path / "bomb.safetensors"
    save_file(tensors, str(bomb), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"its tensors do not match its own recipe: .*shape"):
        model_from_checkpoint(bomb)
    peak = tmp_path / "peak-kib"
    code = (f"import resource, sys\nsys.argv = ['layerwise', 'eval', {str(bomb)!r}]\n"
            f"from layerwise.cli import main\n"
            f"try:\n    main()\nfinally:\n"
            f"    open({str(peak)!r}, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "do not match its own recipe" in done.stderr and "Traceback" not in done.stderr
    assert int(peak.read_text()) < 1_500_000, "peak memory above 1.5 GB: the huge layer was allocated"


@pytest.mark.parametrize("value, message", [
    ("bogus", r"--device: expected auto, cpu, cuda or cuda:N, found 'bogus'"),
    ("meta", r"--device: expected auto, cpu, cuda or cuda:N, found 'meta'"),
    ("mps", r"--device: expected auto, cpu, cuda or cuda:N, found 'mps'"),
])
def test_eval_device_is_validated_and_named(cli, value, message, tmp_path):
    result = cli("eval", str(tmp_path), "--device", value)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert __import__("re").search(message, result.err), result.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_the_option():
    with pytest.raises(LayerwiseError, match=r"^--device is 'cuda:0' but no CUDA device is available"):
        resolve_device("cuda:0", "--device")
    with pytest.raises(LayerwiseError, match=r"^train.device is 'cuda'"):
        resolve_device("cuda")


def nan_trainer(**overrides):
    """The hybrid's shape in small: hsic1 -> bp1 -> hsic2 -> head, so a blow-up in the backprop
    block bp1 reaches a local objective (hsic2) after it, as in the review's mnist_hybrid."""
    data = tiny_recipe()
    data["model"]["subnetworks"][1]["blocks"].insert(0, {
        "name": "hsic2", "layer": "linear", "out": 16, "act": "relu",
        "objective": {"name": "nhsic", "sigma": 5, "beta": 100}})
    del data["model"]["subnetworks"][0]["blocks"][1]["act"]  # a linear bp1 cannot die like a ReLU: it blows up
    recipe = parse_recipe(data, "tiny", [f"{key}={value}" for key, value in overrides.items()])
    torch.manual_seed(0)
    graph = network_from_recipe(recipe, (1, 28, 28), 10)
    return Trainer.from_recipe(graph, recipe)


def train_until_error(trainer, steps=30):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(NonFiniteError) as caught:
        for _ in range(steps):
            trainer.step(torch.randn(64, 1, 28, 28, generator=g), torch.arange(64) % 10)
    return str(caught.value)


def test_a_huge_global_learning_rate_is_blamed_not_sigma():
    message = train_until_error(nan_trainer(**{"optim.global.name": "sgd", "optim.global.lr": 1000000}))
    assert "optim.global.lr = 1e+06" in message and "sigma" not in message, message


def test_a_huge_beta_is_blamed_not_sigma():
    message = train_until_error(nan_trainer(**{"model.subnetworks.sn1.blocks.hsic1.objective.beta": "1e308"}))
    assert "beta = 1e+308" in message and "sigma" not in message, message


def test_a_tiny_sigma_is_still_blamed_on_sigma():
    message = train_until_error(nan_trainer(**{"model.subnetworks.sn1.blocks.hsic1.objective.sigma": "1e-30"}))
    assert "sigma 1e-30 too small" in message, message


def test_out_of_memory_is_one_line_with_the_batch_and_its_kernel_size(monkeypatch):
    trainer = nan_trainer()

    def allocate(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000000 bytes")

    monkeypatch.setattr(trainer, "compute_gradients", allocate)
    batch = [(torch.randn(64, 1, 28, 28), torch.arange(64) % 10)]
    with pytest.raises(LayerwiseError, match=r"out of memory on cpu at data.batch_size 64: .* 64 x 64 Gram"):
        trainer.train_epoch(batch)
    assert "1 GiB" in out_of_memory_message(16384, torch.device("cuda"))


@pytest.mark.integration
def test_a_batch_larger_than_the_training_set_is_refused_before_the_run_folder(cli, tmp_path, mnist_available):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny_recipe(train_limit=128)))
    result = cli("train", str(recipe), "data.batch_size=1000000000", "--runs-dir", str(tmp_path / "runs"))
    assert result.code == 2 and "data.batch_size 1000000000 is more than the 128 training samples" in result.err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("noise, shown", [("1.0000001", "1.0000001"), ("nan", "nan"), ("-0.5", "-0.5")])
def test_noise_out_of_range_is_shown_as_given(cli, noise, shown, tmp_path):
    result = cli("eval", str(tmp_path), "--noise", noise)
    assert result.code == 2 and f"found {shown}" in result.err, result.err


def test_eval_refuses_an_unwritable_report_folder_before_computing(cli, tmp_path):
    path = saved_tiny(tmp_path)
    (tmp_path / "eval").write_text("not a folder")
    result = cli("eval", str(path), "--data-root", str(tmp_path / "nodata"))
    # the report folder is checked first: no data is looked for, nothing is computed
    assert result.code == 2 and "eval: exists but is not a folder" in result.err, result.err


def test_an_objective_width_check_names_the_block_and_key_path():
    from layerwise.hookspecs import hookimpl
    from layerwise.objectives.base import Objective
    from layerwise.testing import use_plugin

    class NeedsTen(Objective):
        name = "needs_ten"

        def __init__(self, config, info):
            super().__init__(config, info)
            if info.out_shape != (10,):
                raise LayerwiseError(f"needs one feature per class (10), found {info.out_shape}")

        def loss(self, z, ctx):
            return z.sum(), {}

    class Plugin:
        @staticmethod
        @hookimpl
        def layerwise_register_objectives(registry):
            registry.register("needs_ten", NeedsTen)

    with use_plugin(Plugin, "needs-ten"):
        data = tiny_recipe()
        data["model"]["subnetworks"][0]["blocks"][0]["objective"] = "needs_ten"
        with pytest.raises(LayerwiseError, match=r"^tiny: model\.subnetworks\[0\]\.blocks\[0\] \('hsic1'\)\.objective "
                                                  r"\(needs_ten\): needs one feature per class"):
            network_from_recipe(parse_recipe(data, "r.yaml"))


def test_an_all_skipped_epoch_in_skip_mode_does_not_advise_skip_mode(tmp_path):
    from layerwise.train_run import kept_message

    assert "set train.on_nonfinite=skip" in kept_message(tmp_path, 2, "stop")
    in_skip_mode = kept_message(tmp_path, 2, "skip")
    assert "on_nonfinite=skip" not in in_skip_mode and "epoch 2" in in_skip_mode


def test_an_unknown_name_with_a_terminal_escape_is_printed_escaped(cli, tmp_path):
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0]["layer"] = "\x1b]0;pwned\x07linear"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(data))
    result = cli("validate", str(recipe))
    assert result.code == 2 and "unknown layer" in result.err
    assert "\x1b" not in result.err and "\x07" not in result.err and "\\x1b]0;pwned\\x07" in result.err
