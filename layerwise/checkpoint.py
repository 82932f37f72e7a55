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
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from layerwise.atomic import write_bytes_atomic
from layerwise.errors import CheckpointError, LayerwiseError, RecipeError, printable
from layerwise.factory import build_on_meta, network_from_recipe, parse_recipe
from layerwise.graph import Network
from layerwise.recipe import Recipe
from layerwise.schema import describe
from layerwise.version import __version__

WEIGHTS_FILE = "model.safetensors"
DIGEST_KEY = "layerwise.sha256"
# What layerwise writes as JSON metadata nests 7 levels at most (a block's objective options inside
# the recipe, an optimizer's betas inside its param groups). A file may come from a stranger, and
# JSON nested thousands deep makes Python's recursive code (json, copy, the schema) overflow.
MAX_JSON_DEPTH = 32
RECIPE_SUFFIXES = (".yaml", ".yml")


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
        if looks_like_recipe(path):  # safetensors would call a YAML file's first bytes a header too large
            raise CheckpointError(recipe_not_checkpoint(path, what)) from None
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt?): {exc}") from None
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and tensor_digest(tensors, metadata) != expected:
        raise CheckpointError(f"{path}: its tensors do not match the checksum saved with them, so the file "
                              f"was corrupted after it was written; use another copy or retrain")
    return tensors, metadata


def looks_like_recipe(path: Path) -> bool:
    """True when ``path`` is a recipe (a ``.yaml``/``.yml`` name, or small YAML text with a model and data)."""
    if path.suffix.lower() in RECIPE_SUFFIXES:
        return True
    import yaml

    try:
        if path.stat().st_size > 1_000_000:  # recipes are a few kB; never parse a large file to guess
            return False
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(data, dict) and "model" in data and "data" in data


def recipe_not_checkpoint(path: Path, what: str) -> str:
    """The message for a recipe given where a checkpoint was expected, with what to pass instead."""
    return (f"{path}: is a recipe, not a {what}; this command takes a run folder (runs/latest is the newest) "
            f"or its {WEIGHTS_FILE}. To train the recipe: layerwise train {shlex.quote(str(path))}")


def one_line(text: str) -> str:
    """``text`` with newlines, terminal escapes and other unprintable characters written as escapes.

    Messages quote strings read from files that may come from strangers; printed raw, such a
    string could break the one-line error or drive the terminal.
    """
    return printable(text, keep_newlines=False)


def json_depth(value: Any) -> int:
    """How deeply lists and mappings nest in ``value`` (0 for a scalar), without recursion."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth + 1)
            if deepest > MAX_JSON_DEPTH:
                break
            pending.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def metadata_json(path: Path, metadata: dict[str, str], key: str) -> Any:
    """The JSON value of metadata ``key``, or a one-line error naming the file and the key."""
    if key not in metadata:
        raise CheckpointError(f"{path}: has no '{key}' metadata")
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError):  # JSONDecodeError, a 5000-digit integer, nesting past the stack
        raise CheckpointError(f"{path}: its '{key}' metadata is not valid JSON") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{path}: its '{key}' metadata nests more than {MAX_JSON_DEPTH} levels deep; "
                              f"layerwise never writes that, so the file was made by something else")
    return value


def metadata_epoch(path: Path, metadata: dict[str, str], default: str | None = None) -> int:
    """The ``epoch`` metadata as a number, or a one-line error saying what was found."""
    text = metadata.get("epoch", default)
    if text is None:
        raise CheckpointError(f"{path}: has no 'epoch' metadata")
    if not re.fullmatch(r"[0-9]{1,9}", text):  # ASCII digits: int() would also take '٣', ' 3', '1_0' and '-1'
        raise CheckpointError(f"{path}: its 'epoch' metadata must be a number of epochs >= 0, "
                              f"found {one_line(describe(text))}")
    return int(text)


def embedded_recipe(path: Path, data: Any) -> Recipe:
    """The recipe a file carries, validated; every problem on one line (the file is not the user's to edit)."""
    try:
        return parse_recipe(data, f"{path} (embedded recipe)")
    except RecipeError as exc:
        shown = "; ".join(exc.problems[:3]) + (f" (and {len(exc.problems) - 3} more)" if len(exc.problems) > 3 else "")
        raise CheckpointError(one_line(f"{path}: its embedded recipe is not valid: {shown}")) from None


def save_network(path: str | Path, graph: Network | dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the network's weights (and buffers) atomically to ``path``, with ``metadata``, the
    versions, and the digest. ``graph`` may also be its state dict (a pipeline's, gathered from
    its stages)."""
    weights = graph if isinstance(graph, dict) else graph.state_dict()
    tensors = {name: t.detach().contiguous().cpu() for name, t in weights.items()}
    metadata = {**metadata, "layerwise.version": __version__, "torch.version": torch.__version__}
    write_bytes_atomic(path, safetensors_with_digest(tensors, metadata))


def save_checkpoint(path: str | Path, graph: Network | dict[str, torch.Tensor], recipe: Recipe, epoch: int,
                    metrics: dict) -> None:
    """Write the graph's weights and the recipe atomically to ``path``."""
    save_network(path, graph, {"layerwise.recipe": json.dumps(recipe.to_dict()), "epoch": str(epoch),
                               "metrics": json.dumps(metrics)})


@dataclass
class Checkpoint:
    """A loaded checkpoint: its recipe, its tensors and its metadata."""

    path: Path
    recipe: Recipe
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def epoch(self) -> int:
        """The number of epochs trained when it was saved (0 when a file does not say)."""
        return metadata_epoch(self.path, self.metadata, default="0")


def find_weights(path: str | Path) -> Path:
    """The weights file for a run folder or a checkpoint path, or an error saying what is missing."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    elif path.is_file() and path.suffix.lower() in RECIPE_SUFFIXES:
        raise CheckpointError(recipe_not_checkpoint(path, "checkpoint"))
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
    recipe = embedded_recipe(path, metadata_json(path, metadata, "layerwise.recipe"))
    metadata_epoch(path, metadata, default="0")  # checked now: before any data is loaded or report written
    return Checkpoint(path, recipe, tensors, metadata)


def load_weights(graph: Network, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``tensors`` into ``graph``, or say exactly which names and shapes do not match."""
    problems = shape_mismatches(graph.state_dict(), tensors)
    if problems:
        raise CheckpointError(f"{source}: does not match the network: " + "; ".join(problems))
    graph.load_state_dict(tensors)


def shape_mismatches(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    """What differs between the tensors a network needs and those a file holds: missing and
    unexpected names, and shapes (``expected`` may live on the meta device)."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for name in sorted(set(expected) & set(tensors)):
        if expected[name].shape != tensors[name].shape:
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, the network needs "
                            f"{tuple(expected[name].shape)}")
    return problems


def model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[Network, Checkpoint]:
    """Rebuild the network from a checkpoint alone and load its weights.

    The embedded recipe comes from the file, so it is untrusted: its network is first built on
    the meta device and its shapes compared with the stored tensors, so a recipe that asks for
    huge layers the file does not hold is refused before anything is allocated.
    """
    ckpt = load_checkpoint(path)
    try:
        problems = shape_mismatches(build_on_meta(ckpt.recipe).state_dict(), ckpt.tensors)
    except LayerwiseError as exc:
        raise CheckpointError(f"{ckpt.path}: its recipe no longer builds: {exc}") from None
    if problems:
        raise CheckpointError(f"{ckpt.path}: its tensors do not match its own recipe: " + "; ".join(problems[:5]))
    graph = network_from_recipe(ckpt.recipe)
    load_weights(graph, ckpt.tensors, ckpt.path)
    return graph.to(device), ckpt
