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
order and noise from the seed and the epoch number. Nor does a learning-rate schedule's position
(:mod:`layerwise.schedule`): it is the epoch, and the lrs it gave are the optimizers' saved
``param_groups``; :func:`restore_state` checks those against the schedule, then puts the
schedulers at the epoch. Loading reads safetensors and JSON only;
nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerwise.atomic import write_bytes_atomic
from layerwise.checkpoint import (
    embedded_recipe,
    load_weights,
    metadata_epoch,
    metadata_json,
    one_line,
    read_safetensors,
    safetensors_with_digest,
)
from layerwise.errors import CheckpointError
from layerwise.graph import Network
from layerwise.recipe import Recipe
from layerwise.runs import record_problem
from layerwise.schedule import position, scheduled_lrs
from layerwise.schema import describe
from layerwise.version import __version__

STATE_FILE = "state.safetensors"
FORMAT = "layerwise-resume-1"


def save_state(
    path: str | Path,
    graph: Network | dict[str, torch.Tensor],
    optimizers: dict[str, torch.optim.Optimizer | dict],
    recipe: Recipe,
    epoch: int,
    record: dict,
    rank_generators: list[torch.Tensor] | None = None,
) -> None:
    """Write the resume state after ``epoch`` (whose metrics are ``record``) atomically to ``path``.

    ``rank_generators``: with several processes, every rank's torch generator state in rank
    order (:meth:`~layerwise.distributed.Group.generator_states`); None saves this process's.
    A pipeline gathers its stages' parts instead of holding them: ``graph`` is then the whole
    state dict and each optimizer its ``state_dict()``.
    """
    weights = graph if isinstance(graph, dict) else graph.state_dict()
    tensors = {f"model/{name}": t.detach().contiguous().cpu() for name, t in weights.items()}
    optim_meta = []
    for index, (name, optimizer) in enumerate(optimizers.items()):
        saved = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
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
    """Read a resume state, with one clear error for a truncated, corrupt, foreign or crafted file.

    Everything that does not depend on the model is checked here (types, ranges, the record, the
    optimizers' layout, the generators); :func:`restore_state` checks the rest against the model
    before it changes anything. A run folder may come from a stranger, and the checksum only
    catches accidents: whoever crafts a file can compute it.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path, "resume state")
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a layerwise resume state (format "
                              f"{one_line(describe(metadata.get('format')))}, expected {FORMAT!r})")
    recipe = embedded_recipe(path, metadata_json(path, metadata, "layerwise.recipe"))
    epoch = metadata_epoch(path, metadata)
    # The state is saved at the end of an epoch, so 0 never appears; past the recipe's end, a
    # resume would report "nothing to resume" and rewrite the run's files from a made-up epoch.
    if not 1 <= epoch <= recipe.train.epochs:
        raise CheckpointError(f"{path}: its 'epoch' metadata is {epoch}; expected 1 to {recipe.train.epochs}, "
                              f"the epochs of its recipe")
    record = metadata_json(path, metadata, "record")
    problem = record_problem(record)
    if problem is None and record["epoch"] != epoch:
        problem = f"its epoch is {record['epoch']}, the state's is {epoch}"
    if problem is not None:
        raise CheckpointError(one_line(f"{path}: its 'record' metadata is not an epoch record: {problem}"))
    optimizers = metadata_json(path, metadata, "optimizers")
    check_layout(path, optimizers, tensors)
    return ResumeState(path, epoch, recipe.to_dict(), record, optimizers, tensors)


def check_layout(path: Path, optimizers: Any, tensors: dict[str, torch.Tensor]) -> None:
    """The checks of a state that need no model: the optimizers' JSON, the tensors' names, the generators."""

    def fail(where: str, expected: str, found: Any) -> None:
        raise CheckpointError(one_line(f"{path}: {where}: expected {expected}, found {describe(found)}"))

    if not isinstance(optimizers, list):
        fail("'optimizers' metadata", "a list of optimizers", optimizers)
    for i, entry in enumerate(optimizers):
        where = f"'optimizers' metadata [{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "param_groups", "state"}:
            fail(where, "a mapping with name, param_groups and state", entry)
        if not isinstance(entry["name"], str):
            fail(f"{where}.name", "a string", entry["name"])
        groups = entry["param_groups"]
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            fail(f"{where}.param_groups", "a list of mappings", groups)
        if not isinstance(entry["state"], dict):
            fail(f"{where}.state", "a mapping", entry["state"])
        for param, entries in entry["state"].items():
            if not re.fullmatch(r"[0-9]{1,9}", param):
                fail(f"{where}.state", "parameter numbers as keys", param)
            if not isinstance(entries, dict):
                fail(f"{where}.state.{param}", "a mapping", entries)
            for key, item in entries.items():
                at = f"{where}.state.{param}.{key}"
                if not isinstance(item, dict) or len(item) != 1 or not {"tensor", "value"} & set(item):
                    fail(at, "a mapping with one key, tensor or value", item)
                if "tensor" in item and (not isinstance(item["tensor"], str) or item["tensor"] not in tensors
                                         or not item["tensor"].startswith(f"optim/{i}/")):
                    fail(f"{at}.tensor", f"the name of one of the file's optim/{i}/ tensors", item["tensor"])
    for name in tensors:
        if not name.startswith(("model/", "optim/", "rng/torch", "rng/cuda/")):
            raise CheckpointError(one_line(f"{path}: unexpected tensor {name!r}; a resume state holds model/, "
                                           f"optim/ and rng/ tensors only"))
    if "rng/torch" not in tensors:
        raise CheckpointError(f"{path}: has no random generator state (rng/torch)")
    torch_size = torch.get_rng_state().numel()
    ranks = sorted(name for name in tensors if name.startswith("rng/torch/"))
    if ranks != sorted(f"rng/torch/rank{r}" for r in range(1, len(ranks) + 1)):
        raise CheckpointError(one_line(f"{path}: its generator tensors should be rng/torch/rank1, rank2, ... "
                                       f"in order, found {', '.join(ranks[:4])}"))
    cuda = [name for name in tensors if name.startswith("rng/cuda/")]
    if any(not re.fullmatch(r"rng/cuda/[0-9]{1,4}", name) for name in cuda):
        raise CheckpointError(f"{path}: its CUDA generator tensors should be named rng/cuda/<device number>")
    for name in ["rng/torch", *ranks, *cuda]:
        generator = tensors[name]
        size = generator.numel() if name in cuda else torch_size  # CUDA's size depends on its version
        if generator.dtype != torch.uint8 or tuple(generator.shape) != (size,):
            raise CheckpointError(f"{path}: tensor {name} is not a generator state: expected {size} bytes "
                                  f"(uint8), found {generator.dtype} of shape {tuple(generator.shape)}")


def restore_state(state: ResumeState, graph: Network, optimizers: dict[str, torch.optim.Optimizer],
                  rank: int = 0, schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] | None = None,
                  stage: bool = False) -> bool:
    """Load weights, optimizer states and random generators from ``state``, or say what does not fit.

    ``stage``: ``optimizers`` are a pipeline stage's, a subset of the saved ones (in their order);
    the whole graph still gets every weight, and the stage then drops the blocks it does not train.

    ``schedulers`` (the trainer's, by optimizer name) are put at the state's epoch, so the next
    epoch trains at the lrs an uninterrupted run would. ``rank`` picks the process's own torch
    generator. Returns False when the state holds none for this rank (the run was saved by fewer
    processes); the generator is then left as it was.
    """
    schedulers = schedulers or {}
    # Everything is checked before anything is loaded: a state that does not fit fails whole.
    saved_names = [entry["name"] for entry in state.optimizers]
    if saved_names != list(optimizers) and not (stage and set(optimizers) <= set(saved_names)):
        raise CheckpointError(one_line(f"{state.path}: holds optimizers {saved_names[:6]}, the recipe builds "
                                       f"{list(optimizers)[:6]}"))
    entries = [entry for entry in state.optimizers if entry["name"] in optimizers]
    for entry, optimizer in zip(entries, optimizers.values(), strict=True):
        check_optimizer(state, entry, optimizer)
        if entry["name"] in schedulers:
            check_schedule(state, entry, schedulers[entry["name"]])
    load_weights(graph, state.weights(), state.path)
    for entry, optimizer in zip(entries, optimizers.values(), strict=True):
        try:
            optimizer.load_state_dict(optimizer_state_dict(entry, state.tensors, optimizer))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # checked above; torch may still object
            raise CheckpointError(one_line(f"{state.path}: optimizer '{entry['name']}' does not fit the recipe: "
                                           f"{exc}")) from None
    for scheduler in schedulers.values():
        position(scheduler, state.epoch)
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
        try:
            torch.cuda.set_rng_state_all(cuda)
        except (RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{state.path}: unusable CUDA generator state: {exc}") from None
    return True


# The state each optimizer keeps per parameter (torch 2.x): "step" is a scalar, the other
# tensors have the parameter's shape. A missing key or a wrong shape would fail, or silently
# broadcast into NaNs that get blamed on the recipe, only once training has started.
STATE_KEYS = {torch.optim.Adam: {"step", "exp_avg", "exp_avg_sq"}, torch.optim.AdamW: {"step", "exp_avg", "exp_avg_sq"},
              torch.optim.SGD: {"momentum_buffer"}}


def check_optimizer(state: ResumeState, entry: dict, optimizer: torch.optim.Optimizer) -> None:
    """Say which key of a saved optimizer does not fit the live one: its groups' hyper-parameters
    (types and ranges; flags that pick code paths must be equal) and its tensors' shapes."""
    name = entry["name"]

    def fail(where: str, expected: str, found: Any) -> None:
        raise CheckpointError(one_line(f"{state.path}: optimizer '{name}' {where}: expected {expected}, "
                                       f"found {describe(found)}"))

    live_groups = optimizer.state_dict()["param_groups"]
    if len(entry["param_groups"]) != len(live_groups):
        fail("param_groups", f"{len(live_groups)} group(s)", entry["param_groups"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for g, (saved, live) in enumerate(zip(entry["param_groups"], live_groups, strict=True)):
        for key in saved:
            if key not in live:
                fail(f"param_groups[{g}]", f"only the keys {', '.join(live)}", key)
        for key, expected in live.items():
            where = f"param_groups[{g}].{key}"
            if key not in saved:
                if isinstance(expected, (bool, type(None))):
                    continue  # a flag newer than the file: torch gives it its default
                fail(where, "a value", None)
            value = saved[key]
            if key == "params":
                if value != expected:
                    fail(where, f"the parameter numbers {expected[:4]}{' ...' if len(expected) > 4 else ''}", value)
            elif isinstance(expected, tuple):
                if not (isinstance(value, list) and len(value) == len(expected) and all(map(is_size, value))):
                    fail(where, f"{len(expected)} numbers >= 0", value)
            elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
                if not is_size(value):
                    fail(where, "a finite number >= 0", value)
            elif type(value) is not type(expected) or value != expected:
                fail(where, f"{expected!r}, as the recipe gives", value)
    required = STATE_KEYS.get(type(optimizer))
    if required is not None and "step" in required and any(g.get("amsgrad") for g in optimizer.param_groups):
        required = required | {"max_exp_avg_sq"}
    for param, entries in entry["state"].items():
        where = f"state.{param}"
        if int(param) >= len(params):
            fail("state", f"parameter numbers below {len(params)}", param)
        if required is not None and set(entries) != required:
            fail(where, f"the keys {', '.join(sorted(required))}", sorted(entries))
        shape = tuple(params[int(param)].shape)
        for key, item in entries.items():
            if "value" in item:
                value = item["value"]
                if key == "step" and is_size(value) or key == "momentum_buffer" and value is None:
                    continue
                fail(f"{where}.{key}", "a tensor" if key != "step" else "a number of steps", value)
            tensor = state.tensors[item["tensor"]]
            expected_shape = () if key == "step" else shape
            if not tensor.is_floating_point() or tuple(tensor.shape) != expected_shape:
                raise CheckpointError(
                    f"{state.path}: optimizer '{name}' {where}.{key} (tensor {item['tensor']}) has "
                    f"{tensor.dtype} of shape {tuple(tensor.shape)}, the parameter it belongs to needs a floating "
                    f"tensor of shape {expected_shape}")


def check_schedule(state: ResumeState, entry: dict, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """The lrs saved with a scheduled optimizer must be the ones its schedule gives after the state's
    epoch, from the recipe's base lrs: otherwise the file was saved by another schedule (another
    version of layerwise, or a crafted file), and continuing would change the run's lrs mid-way."""
    expected = scheduled_lrs(scheduler, state.epoch)
    for g, (saved, lr, base) in enumerate(zip(entry["param_groups"], expected, scheduler.base_lrs, strict=True)):
        for key, value, what in (("initial_lr", base, "the recipe's lr"),
                                 ("lr", lr, f"the schedule's lr after epoch {state.epoch}")):
            if saved.get(key) != value or isinstance(saved.get(key), bool):
                raise CheckpointError(one_line(
                    f"{state.path}: optimizer '{entry['name']}' param_groups[{g}].{key}: expected {value!r}, "
                    f"{what}, found {describe(saved.get(key))}; it was not saved by this recipe's schedule"))


def is_size(value: Any) -> bool:
    """A finite number >= 0 (a learning rate, a beta, a step count) that fits a float, not a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0  # an int of 400 digits overflows float()
    except OverflowError:
        return False


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
        for index, (a, b) in enumerate(zip(saved, current, strict=False)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    return None if saved == current else (path or "the whole recipe")
