"""The resume state: everything a run needs to continue exactly where its last epoch ended.

``state.safetensors`` sits beside ``model.safetensors`` in the run folder and is rewritten
atomically at the end of every epoch. Its tensors are

- ``model/<name>``: the weights and buffers;
- ``optim/<i>/<param index>/<key>``: the tensor state of optimizer ``i`` (Adam's moments and step);
- ``rng/torch`` and ``rng/cuda/<device>``: the random generators' states; with several
  processes, ``rng/torch`` is rank 0's and ``rng/torch/rank<r>`` rank r's (each rank draws its
  own dropout masks);

and its string metadata holds the epoch, the recipe, the epoch's metrics record and, as JSON,
each optimizer's ``param_groups`` and non-tensor state, plus a checksum of it all.

Why one file that repeats the weights: it is the run's single commit point. An epoch ends by
writing ``state.safetensors`` first, then ``model.safetensors`` and ``metrics.jsonl``, which
are views that a resume rebuilds from the state. A kill at any moment therefore leaves one
whole, self-consistent state (weights, moments, generators and epoch all of the same epoch);
two files that had to agree could be caught half-updated and mix epochs.

The data order needs no saving: :class:`~layerwise.data.BatchStream` derives each epoch's
order and noise from the seed and the epoch number. Loading reads safetensors and JSON only;
nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerwise import __version__
from layerwise.atomic import write_bytes_atomic
from layerwise.checkpoint import load_weights, read_safetensors, safetensors_with_digest
from layerwise.errors import CheckpointError
from layerwise.graph import Graph
from layerwise.recipe import Recipe

STATE_FILE = "state.safetensors"
FORMAT = "layerwise-resume-1"


def save_state(
    path: str | Path,
    graph: Graph,
    optimizers: dict[str, torch.optim.Optimizer],
    recipe: Recipe,
    epoch: int,
    record: dict,
    rank_generators: list[torch.Tensor] | None = None,
) -> None:
    """Write the resume state after ``epoch`` (whose metrics are ``record``) atomically to ``path``.

    ``rank_generators``: with several processes, every rank's torch generator state in rank
    order (:meth:`~layerwise.distributed.Group.generator_states`); None saves this process's.
    """
    tensors = {f"model/{name}": t.detach().contiguous().cpu() for name, t in graph.state_dict().items()}
    optim_meta = []
    for index, (name, optimizer) in enumerate(optimizers.items()):
        saved = optimizer.state_dict()
        state: dict[str, dict[str, Any]] = {}
        for param, entries in saved["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensor_key = f"optim/{index}/{param}/{key}"
                    tensors[tensor_key] = value.detach().contiguous().cpu()
                    state.setdefault(str(param), {})[key] = {"tensor": tensor_key}
                else:
                    state.setdefault(str(param), {})[key] = {"value": value}
        optim_meta.append({"name": name, "param_groups": saved["param_groups"], "state": state})
    generators = rank_generators if rank_generators is not None else [torch.get_rng_state()]
    tensors["rng/torch"] = generators[0]
    for rank, generator in enumerate(generators[1:], start=1):
        tensors[f"rng/torch/rank{rank}"] = generator
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{device}"] = rng
    metadata = {
        "format": FORMAT,
        "epoch": str(epoch),
        "layerwise.recipe": json.dumps(recipe.to_dict()),
        "record": json.dumps(record),
        "optimizers": json.dumps(optim_meta),
        "layerwise.version": __version__,
        "torch.version": torch.__version__,
    }
    write_bytes_atomic(path, safetensors_with_digest(tensors, metadata))


@dataclass
class ResumeState:
    """A loaded resume state; :func:`restore_state` puts it back into a graph and its optimizers."""

    path: Path
    epoch: int
    recipe: dict
    record: dict
    optimizers: list[dict]
    tensors: dict[str, torch.Tensor]

    @property
    def processes(self) -> int:
        """How many processes trained the run when it was saved: one generator each."""
        return 1 + sum(key.startswith("rng/torch/rank") for key in self.tensors)

    def weights(self) -> dict[str, torch.Tensor]:
        """The graph's state dict as saved."""
        return {key[len("model/"):]: t for key, t in self.tensors.items() if key.startswith("model/")}


def load_state(path: str | Path) -> ResumeState:
    """Read a resume state, with one clear error for a truncated, corrupt or foreign file."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, "resume state")
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a layerwise resume state (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        epoch = int(metadata["epoch"])
        recipe = json.loads(metadata["layerwise.recipe"])
        record = json.loads(metadata["record"])
        optimizers = json.loads(metadata["optimizers"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: its metadata is incomplete or not valid JSON ({exc})") from None
    if "rng/torch" not in tensors:
        raise CheckpointError(f"{path}: has no random generator state (rng/torch)")
    return ResumeState(path, epoch, recipe, record, optimizers, tensors)


def restore_state(state: ResumeState, graph: Graph, optimizers: dict[str, torch.optim.Optimizer], rank: int = 0) -> bool:
    """Load weights, optimizer states and random generators from ``state``, or say what does not fit.

    ``rank`` picks the process's own torch generator. Returns False when the state holds none for
    this rank (the run was saved by fewer processes); the generator is then left as it was.
    """
    load_weights(graph, state.weights(), state.path)
    saved_names = [entry.get("name") for entry in state.optimizers]
    if saved_names != list(optimizers):
        raise CheckpointError(f"{state.path}: holds optimizers {saved_names}, the recipe builds {list(optimizers)}")
    for entry, optimizer in zip(state.optimizers, optimizers.values()):
        try:
            optimizer.load_state_dict(optimizer_state_dict(entry, state.tensors, optimizer))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{state.path}: optimizer '{entry['name']}' does not fit the recipe: {exc}") from None
    generator = state.tensors.get("rng/torch" if rank == 0 else f"rng/torch/rank{rank}")
    if generator is None:
        return False
    try:
        torch.set_rng_state(generator)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{state.path}: unusable random generator state: {exc}") from None
    cuda = []
    while f"rng/cuda/{len(cuda)}" in state.tensors:
        cuda.append(state.tensors[f"rng/cuda/{len(cuda)}"])
    # CUDA generators are restored only onto the same number of devices; a run resumed on
    # other hardware continues correctly but not bit-identically.
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    return True


def optimizer_state_dict(entry: dict, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Rebuild the ``state_dict`` that :func:`save_state` flattened, for ``optimizer.load_state_dict``."""
    state = {}
    for param, entries in entry["state"].items():
        state[int(param)] = {
            key: tensors[item["tensor"]] if "tensor" in item else item["value"] for key, item in entries.items()
        }
    groups = []
    for saved, live in zip(entry["param_groups"], optimizer.param_groups, strict=True):
        # JSON turned tuples (Adam's betas) into lists; give them back the type the optimizer uses.
        groups.append({key: tuple(value) if isinstance(live.get(key), tuple) else value
                       for key, value in saved.items()})
    return {"state": state, "param_groups": groups}


def first_difference(saved: Any, current: Any, path: str = "") -> str | None:
    """The first key path where two plain-data recipes differ, or None when they are equal."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in list(saved) + [k for k in current if k not in saved]:
            found = first_difference(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for index, (a, b) in enumerate(zip(saved, current)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    return None if saved == current else (path or "the whole recipe")
