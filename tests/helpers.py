"""Helpers shared by the test modules (import them as ``from tests.helpers import ...``).

Fixtures live in ``conftest.py``; plain functions and constants live here, because pytest
does not mean conftest files to be imported, and test modules never import one another.
This module imports only the standard library at import time (torch and layerwise inside
the functions that need them), so subprocess scripts can import it cheaply.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from layerwise.distributed import Group
    from layerwise.graph import Network
    from layerwise.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# The layerwise modules that the shipped plugins (and the plugin guide) may import: the public API.
PUBLIC_MODULES = {"layerwise", "layerwise.objectives.base", "layerwise.errors", "layerwise.testing",
                  "layerwise.streams", "layerwise.data"}


def real_mnist_present() -> bool:
    """Whether the real MNIST files are beside the repository (as in CI: ../shared/data)."""
    return (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").exists()


class CliResult:
    """Exit code and captured output of one in-process ``layerwise`` call."""

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


def call_main(*args: str) -> int:
    """Run ``layerwise ARGS...`` in this process through the real entry point (its error handling
    included); return the exit code. The caller captures the output."""
    from layerwise.cli import main

    argv, sys.argv = sys.argv, ["layerwise", *args]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return 0


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, no traceback, and an error that starts with 'error:' and holds every fragment.

    Progress lines (the run folder, say) may come before the error; the error itself is one
    message, though a message listing several problems puts each on a line of its own. Returns
    the message from 'error:' on, with any wrapping undone."""
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err + result.out
    lines = result.err.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    assert start is not None, result.err
    text = " ".join(" ".join(lines[start:]).split())
    for fragment in fragments:
        assert fragment in text, text
    return text


def tiny_recipe(**data_overrides) -> dict:
    """A small hybrid MLP recipe as plain data, for fast tests."""
    data = {"dataset": "mnist", "batch_size": 64, **data_overrides}
    return {
        "name": "tiny",
        "seed": 0,
        "data": data,
        "model": {
            "subnetworks": [
                {"name": "sn1", "blocks": [
                    {"name": "hsic1", "layer": "linear", "out": 32, "act": "relu",
                     "objective": {"name": "nhsic", "sigma": 5, "beta": 100}},
                    {"name": "bp1", "layer": "linear", "out": 16, "act": "relu"},
                ]},
                {"name": "sn2", "blocks": [{"name": "head", "layer": "linear", "out": 10}]},
            ]
        },
        "train": {"epochs": 1, "device": "cpu"},
    }


def local_objectives() -> list[str]:
    """Every local objective in the registry (built-in and installed plugins'), by name."""
    from layerwise.plugins import registries

    objectives = registries().objectives
    return [name for name in objectives.names() if name not in ("none", "backprop") and objectives.get(name).local]


# --------------------------------------------------------------------------- float64 gradients (distributed)

INPUT_SHAPE = (1, 4, 4)
NHSIC = {"name": "nhsic", "sigma": 2.0, "beta": 10.0}


def mixed_recipe() -> dict:
    """Every kind of block in one graph: nhsic (cca and cka) before and after backprop blocks, so the
    global gradient passes through local blocks, the shipped plugins' batch-coupled objectives, and
    batch-norm over channels (conv) and over features."""
    import importlib.util

    blocks = [
        {"name": "conv", "layer": "conv2d", "out": 2, "kernel_size": 3, "padding": 1, "act": "tanh", "norm": True},
        {"name": "hsic1", "layer": "linear", "out": 8, "act": "tanh", "objective": NHSIC},
        {"name": "bp1", "layer": "linear", "out": 8, "act": "tanh"},
        {"name": "hsic2", "layer": "linear", "out": 8, "act": "tanh", "objective": {**NHSIC, "normalization": "cka"}},
    ]
    for plugin, objective in (("layerwise_localce", "localce"), ("layerwise_simmatch", "simmatch")):
        if importlib.util.find_spec(plugin) is not None:
            blocks.append({"name": objective, "layer": "linear", "out": 8, "act": "tanh", "objective": objective})
    blocks += [{"name": "bp2", "layer": "linear", "out": 8, "act": "tanh", "norm": True},
               {"name": "head", "layer": "linear", "out": 10}]
    return {"name": "mixed", "data": {"dataset": "mnist"}, "train": {"device": "cpu"},
            "model": {"subnetworks": [{"name": "s", "blocks": blocks}]}}


def float64_trainer(group: Group | None = None) -> tuple[Network, Trainer]:
    """The mixed recipe's graph in float64, seeded, and its trainer (in ``group`` if given)."""
    import torch

    from layerwise.factory import network_from_recipe, parse_recipe
    from layerwise.trainer import Trainer

    recipe = parse_recipe(mixed_recipe(), "mixed")
    torch.manual_seed(0)
    graph = network_from_recipe(recipe, INPUT_SHAPE, 10).double()
    return graph, Trainer.from_recipe(graph, recipe, group=group)


def float64_batch(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random float64 batch for the mixed recipe, with labels 0..9 in turn."""
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randn(size, *INPUT_SHAPE, dtype=torch.float64, generator=g), torch.arange(size) % 10


def gradients(graph: Network) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient that was computed, by parameter name."""
    return {name: p.grad.clone() for name, p in graph.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- run folders and subprocesses


def assert_same_tensors(path_a: Path, path_b: Path) -> None:
    """Every tensor of two safetensors files is bit-identical (torch.equal), and no name is missing."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(path_a), load_file(path_b)
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different}"


def epochs_in_metrics(run: Path) -> list[int]:
    """The epoch of each record in a run folder's metrics.jsonl."""
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def start_layerwise(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """``python -m layerwise ARGS`` in the background, output captured."""
    return subprocess.Popen([sys.executable, "-m", "layerwise", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a process started by :func:`start_layerwise`: its exit code, stdout and stderr."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Poll until ``path`` exists (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"process ended before {path} appeared: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.005)


# --------------------------------------------------------------------------- crafted run folders


def make_finished_run(folder: Path, epochs: int = 1) -> Path:
    """A run folder whose last epoch ended, as training leaves it (recipe.yaml, env.json, eval/,
    a resume state whose optimizers have stepped once, model.safetensors, metrics.jsonl), made
    from the tiny recipe without any data."""
    import torch

    from layerwise.checkpoint import WEIGHTS_FILE, save_checkpoint
    from layerwise.factory import build_model, parse_recipe
    from layerwise.recipe import dump_recipe
    from layerwise.resume import STATE_FILE, save_state
    from layerwise.trainer import Trainer

    data = tiny_recipe(train_limit=64)
    data["train"]["epochs"] = epochs
    recipe = parse_recipe(data, "tiny")
    torch.manual_seed(0)
    graph = build_model(recipe)
    trainer = Trainer.from_recipe(graph, recipe)
    trainer.step(torch.rand(8, 1, 28, 28), torch.arange(8))
    record = {"epoch": epochs, "train_acc": 0.5, "global_loss": 2.0, "blocks": {"hsic1": {"loss": -0.1}},
              "test_acc": 0.5, "test_loss": 2.0, "train_seconds": 0.1}
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    (folder / "env.json").write_text("{}\n")
    (folder / "eval").mkdir()
    save_state(folder / STATE_FILE, graph, trainer.optimizers(), recipe, epochs, record)
    save_checkpoint(folder / WEIGHTS_FILE, graph, recipe, epochs, record)
    (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return folder


def resign(path: Path, metadata: dict | None = None, tensors: dict | None = None) -> None:
    """Change a safetensors file's metadata or tensors (a value of None deletes the key) and
    write it with a fresh checksum, as whoever crafts a file can: the checksum catches accidents."""
    from layerwise.checkpoint import DIGEST_KEY, read_safetensors, safetensors_with_digest

    saved_tensors, saved_metadata = read_safetensors(path, "file")
    saved_metadata.pop(DIGEST_KEY, None)
    for saved, changes in ((saved_metadata, metadata), (saved_tensors, tensors)):
        for key, value in (changes or {}).items():
            if value is None:
                saved.pop(key, None)
            else:
                saved[key] = value
    path.write_bytes(safetensors_with_digest(saved_tensors, saved_metadata))


def folder_snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``folder``, hidden ones included."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def block_imports(monkeypatch, *prefixes: str) -> None:
    """Make every import of a module starting with one of ``prefixes`` fail, as where an optional
    extra is not installed (modules already imported included)."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith(prefixes):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (torchrun puts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree
