"""safetensors checkpoints that carry their own recipe, so a model rebuilds from the file alone.

``model.safetensors`` holds the weights (and buffers) of every block, with string metadata:
``layerwise.recipe`` (the resolved recipe as JSON), ``layerwise.version``, ``torch.version``,
``epoch``, ``metrics`` (JSON) and ``layerwise.sha256``, a digest of the tensors and the other
metadata that catches a file corrupted on disk (safetensors itself checks only the header's
syntax and the sizes).
Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from layerwise import __version__
from layerwise.atomic import write_bytes_atomic
from layerwise.errors import CheckpointError, LayerwiseError
from layerwise.graph import Graph
from layerwise.recipe import Recipe, parse_recipe

WEIGHTS_FILE = "model.safetensors"
DIGEST_KEY = "layerwise.sha256"


def tensor_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of the metadata (but the digest itself) and of every tensor's name, dtype, shape
    and bytes, in name order."""
    digest = hashlib.sha256()
    plain = {key: value for key, value in metadata.items() if key != DIGEST_KEY}
    digest.update(json.dumps(plain, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def safetensors_with_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors file holding ``tensors``, ``metadata`` and their digest."""
    return safetensors_bytes(tensors, metadata={**metadata, DIGEST_KEY: tensor_digest(tensors, metadata)})


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with one clear error for any corruption.

    ``what`` names the file's role in messages, e.g. 'safetensors checkpoint'.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt?): {exc}") from None
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and tensor_digest(tensors, metadata) != expected:
        raise CheckpointError(f"{path}: its tensors do not match the checksum saved with them, so the file "
                              f"was corrupted after it was written; use another copy or retrain")
    return tensors, metadata


def save_checkpoint(path: str | Path, graph: Graph, recipe: Recipe, epoch: int, metrics: dict) -> None:
    """Write the graph's weights and the recipe atomically to ``path``."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in graph.state_dict().items()}
    metadata = {
        "layerwise.recipe": json.dumps(recipe.to_dict()),
        "layerwise.version": __version__,
        "torch.version": torch.__version__,
        "epoch": str(epoch),
        "metrics": json.dumps(metrics),
    }
    write_bytes_atomic(path, safetensors_with_digest(tensors, metadata))


@dataclass
class Checkpoint:
    """A loaded checkpoint: its recipe, its tensors and its metadata."""

    path: Path
    recipe: Recipe
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def epoch(self) -> int:
        """The number of epochs trained when it was saved."""
        return int(self.metadata.get("epoch", "0"))


def find_weights(path: str | Path) -> Path:
    """The weights file for a run folder or a checkpoint path, or an error saying what is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there; pass a run folder or a .safetensors file "
                              f"(runs/latest is the newest run)")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (a file or a run folder), with one clear error for any corruption."""
    path = find_weights(path)
    tensors, metadata = read_safetensors(path, "safetensors checkpoint")
    if "layerwise.recipe" not in metadata:
        raise CheckpointError(f"{path}: has no 'layerwise.recipe' metadata, so it was not written by layerwise")
    try:
        recipe_data = json.loads(metadata["layerwise.recipe"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its 'layerwise.recipe' metadata is not valid JSON") from None
    recipe = parse_recipe(recipe_data, f"{path} (embedded recipe)")
    return Checkpoint(path, recipe, tensors, metadata)


def load_weights(graph: Graph, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``tensors`` into ``graph``, or say exactly which names and shapes do not match."""
    expected = graph.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for name in sorted(set(expected) & set(tensors)):
        if expected[name].shape != tensors[name].shape:
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, the recipe needs {tuple(expected[name].shape)}")
    if problems:
        raise CheckpointError(f"{source}: does not match the recipe: " + "; ".join(problems))
    graph.load_state_dict(tensors)


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[Graph, Checkpoint]:
    """Rebuild the network from a checkpoint alone and load its weights."""
    from layerwise.plugins import registries

    ckpt = load_checkpoint(path)
    spec = registries().datasets.get(ckpt.recipe.data.dataset)
    try:
        graph = Graph(ckpt.recipe, spec.shape, spec.num_classes)
    except LayerwiseError as exc:
        raise CheckpointError(f"{ckpt.path}: its recipe no longer builds: {exc}") from None
    load_weights(graph, ckpt.tensors, ckpt.path)
    return graph.to(device), ckpt
