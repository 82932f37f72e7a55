"""safetensors checkpoints: round trips, embedded recipes, mismatches and corruption."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from layerwise.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from layerwise.errors import CheckpointError, LayerwiseError
from layerwise.factory import network_from_recipe, parse_recipe
from tests.helpers import tiny_recipe


def trained_graph(data=None):
    recipe = parse_recipe(data or tiny_recipe(), "tiny")
    torch.manual_seed(0)
    graph = network_from_recipe(recipe, (1, 28, 28), 10)
    with torch.no_grad():  # move batch-norm-free weights off their init so a fresh graph differs
        for p in graph.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return recipe, graph


def test_round_trip_restores_identical_predictions(tmp_path):
    recipe, graph = trained_graph({**tiny_recipe(), "train": {"epochs": 3, "device": "cpu"}})
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, graph, recipe, epoch=3, metrics={"test_acc": 0.5})
    rebuilt, ckpt = model_from_checkpoint(path)  # from the file alone: no recipe passed in
    x = torch.randn(5, 1, 28, 28)
    graph.eval()
    rebuilt.eval()
    assert torch.equal(graph(x), rebuilt(x))
    assert ckpt.epoch == 3
    assert ckpt.recipe == recipe


def test_metadata_holds_the_resolved_recipe_and_versions(tmp_path):
    recipe, graph = trained_graph()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, graph, recipe, epoch=1, metrics={"a": 1.0})
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["layerwise.recipe"]) == recipe.to_dict()
    assert meta["torch.version"] == torch.__version__
    assert meta["epoch"] == "1" and json.loads(meta["metrics"]) == {"a": 1.0}
    assert "layerwise.version" in meta


def test_run_folder_path_is_accepted(tmp_path):
    recipe, graph = trained_graph()
    save_checkpoint(tmp_path / "model.safetensors", graph, recipe, epoch=1, metrics={})
    assert load_checkpoint(tmp_path).path == tmp_path / "model.safetensors"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_truncated_checkpoint_is_detected(tmp_path):
    recipe, graph = trained_graph()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, graph, recipe, epoch=1, metrics={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_checkpoint_of_another_recipe_names_the_mismatch(tmp_path):
    recipe, graph = trained_graph()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, graph, recipe, epoch=1, metrics={})
    other = tiny_recipe()
    other["model"]["subnetworks"][0]["blocks"][1]["out"] = 24
    other_graph = network_from_recipe(parse_recipe(other, "other"), (1, 28, 28), 10)
    from layerwise.checkpoint import load_weights

    with pytest.raises(CheckpointError,
                       match=r"blocks\.bp1\.body\.0\.weight has shape \(16, 32\), the network needs \(24, 32\)"):
        load_weights(other_graph, load_checkpoint(path).tensors, path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    recipe, graph = trained_graph()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, graph, recipe, epoch=1, metrics={})
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(LayerwiseError, match="No space left on device; the previous version is untouched"):
        save_checkpoint(path, graph, recipe, epoch=2, metrics={})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"], "no temporary file is left behind"


def test_flipped_bytes_in_the_tensors_fail_the_checksum(tmp_path):
    """safetensors checks only the header and sizes; the digest in the metadata catches the rest."""
    recipe, graph = trained_graph()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, graph, recipe, epoch=1, metrics={})
    data = bytearray(path.read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])  # the end of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    """Files written before the checksum existed (or by other tools) load as before."""
    from safetensors.torch import save_file

    recipe, graph = trained_graph()
    tensors = {name: t.contiguous() for name, t in graph.state_dict().items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"layerwise.recipe": json.dumps(recipe.to_dict())})
    assert load_checkpoint(tmp_path).recipe == recipe


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    # mkstemp creates 0600 files; a shared run folder needs its checkpoints readable by the group.
    from layerwise import atomic

    previous = os.umask(0o027)
    try:
        atomic.file_mode.cache_clear()
        atomic.write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
        atomic.file_mode.cache_clear()
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
