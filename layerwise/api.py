"""The Python API: what the command line does, as functions, and networks of your own modules.

Served lazily from the package root (``import layerwise as lw; lw.train(...)``); docs/python.md
is the guide. Every mistake raises :class:`~layerwise.errors.LayerwiseError` with the same
message the command line prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerwise.checkpoint import (
    embedded_recipe,
    find_weights,
    metadata_json,
    model_from_checkpoint,
    read_safetensors,
    save_network,
)
from layerwise.checkpoint import (
    load_weights as copy_weights,
)
from layerwise.data import BatchStream, check_augment, check_noise_space, load_split
from layerwise.errors import CheckpointError, LayerwiseError, RecipeError
from layerwise.factory import build_model, dataset_spec, load_recipe, parse_recipe
from layerwise.graph import Block, Network, ObjectiveSpec
from layerwise.noise_eval import noise_levels, noise_results
from layerwise.plugins import registries
from layerwise.recipe import AugmentConfig, Recipe, objective_config
from layerwise.runs import METRICS_FILE, read_metrics
from layerwise.schema import Problems, build, to_plain
from layerwise.splitting import split
from layerwise.train_run import train_recipe
from layerwise.trainer import Trainer, resolve_device
from layerwise.trainer import evaluate as evaluate_batches

__all__ = [
    "Block", "Network", "Run", "Trainer", "batches", "build_model", "evaluate", "load_model", "load_recipe",
    "load_weights", "objective", "save", "split", "train",
]

NETWORK_KEY = "layerwise.network"
"""Metadata of :func:`save`: the blocks (names, objectives, wiring), input shape and class count."""


def objective(name: str, **options: Any) -> ObjectiveSpec:
    """An objective for a :class:`Block`, validated as a recipe's would be (same messages)::

        lw.objective("nhsic", sigma=10, beta=100)
    """
    regs = registries()
    problems = Problems(context=regs)
    config = objective_config({"name": name, **options}, "objective", regs.objectives, problems)
    if problems:
        raise RecipeError(f"objective({name!r})", problems.items)
    return ObjectiveSpec(name, regs.objectives.get(name), config)


@dataclass
class Run:
    """A finished training run: its folder, and one metrics record per epoch."""

    path: Path
    metrics: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        """The last epoch's record (test_acc, train_acc, per-block metrics, ...)."""
        return self.metrics[-1] if self.metrics else {}


def train(recipe: Recipe | str | Path, overrides: Sequence[str] = (), *, runs_dir: str | Path = "runs",
          data_root: str | Path | None = None, progress: bool = False) -> Run:
    """What ``layerwise train`` does: train a recipe (a :class:`Recipe`, a YAML path or a shipped
    name, plus overrides) in a new run folder under ``runs_dir``; return the :class:`Run`."""
    if isinstance(recipe, Recipe):
        if overrides:
            recipe = parse_recipe(recipe.to_dict(), recipe.name, overrides)
    else:
        recipe = load_recipe(recipe, overrides)
    path = train_recipe(recipe, runs_dir, data_root, show_progress=progress, quiet=not progress)
    if path is None:  # a torchrun worker other than rank 0: it writes nothing
        return Run(Path(runs_dir))
    return Run(path, read_metrics(path / METRICS_FILE))


def load_model(path: str | Path, device: torch.device | str = "cpu") -> Network:
    """A trained network from a run folder (``runs/latest``) or a recipe-built ``.safetensors`` file."""
    try:
        network, _ = model_from_checkpoint(path, device)
    except CheckpointError:
        weights = find_weights(path)
        _, metadata = read_safetensors(weights, "safetensors checkpoint")
        if NETWORK_KEY in metadata and "layerwise.recipe" not in metadata:
            raise CheckpointError(f"{weights}: holds a network built in Python, which the file cannot rebuild; "
                                  f"build the same network, then call layerwise.load_weights(network, path)") from None
        raise
    return network


def evaluate(model: Network | str | Path, data: str | Iterable, noise: float | Sequence[float] | None = None, *,
             batch_size: int = 1000, noise_seed: int = 0, device: torch.device | str | None = None,
             data_root: str | Path | None = None, progress: bool = False,
             noise_space: str = "pixel") -> dict[float, float]:
    """Test accuracy ``{noise std: accuracy}``, as ``layerwise eval`` computes it.

    ``model`` is a network or a run folder / checkpoint path. ``data`` is a dataset name (its
    test split; ``noise`` stds in [0, 1], 0 always included) or any iterable of ``(x, y)``
    batches such as a DataLoader (evaluated as given, reported under 0.0). ``noise_space`` is
    ``pixel`` (before normalisation, clipped: the paper's protocol) or ``normalized`` (after
    it, unclipped: the authors' notebook), as ``layerwise eval --noise-space``.
    """
    if isinstance(model, (str, Path)):
        model = load_model(model)
    if not isinstance(model, Network):
        raise LayerwiseError(f"evaluate: expected a layerwise.Network or a run folder, found {type(model).__name__}")
    if device is not None:
        model = model.to(resolve_device(str(device)))
    check_noise_space(noise_space)
    if not isinstance(data, str):
        if noise not in (None, 0, [0], (0,)):
            raise LayerwiseError("evaluate: noise needs a dataset name (it is added to the images before or "
                                 "after normalisation, as noise_space says); a loader is evaluated as it is")
        return {0.0: evaluate_batches(model, data)["acc"]}
    levels = noise_levels([0.0] if noise is None else [noise] if isinstance(noise, (int, float)) else noise,
                          "evaluate: noise")
    spec = registries().datasets.get(data)
    if model.materialized and model.input_shape != tuple(spec.shape):
        raise LayerwiseError(f"evaluate: the network takes inputs of shape {model.input_shape}, but '{data}' "
                             f"has images of shape {tuple(spec.shape)}")
    results = noise_results(model, spec, levels, data_root, model.device, noise_seed, batch_size, progress,
                            noise_space)
    return {row["noise"]: row["acc"] for row in results}


class Batches:
    """A dataset split as ``(x, y)`` batches, normalised, on ``device``. Each pass over it is the
    next epoch (1, 2, ...), numbered as ``layerwise train`` numbers them, so a recipe's seed
    gives the same order and noise in Python as on the command line."""

    def __init__(self, stream: BatchStream):
        self.stream = stream
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch += 1
        self.stream.set_epoch(self.epoch)
        for x, y, _ in self.stream:
            yield x, y


def batches(dataset: str, split: str = "train", *, batch_size: int = 256, shuffle: bool | None = None,
            seed: int = 0, noise: float = 0.0, limit: int | None = None, device: torch.device | str = "cpu",
            data_root: str | Path | None = None, noise_space: str = "pixel",
            augment: AugmentConfig | dict[str, Any] | None = None) -> Batches:
    """Batches of a dataset by name (``mnist``, ``fashion_mnist``, ``cifar10`` or a plugin's).

    ``shuffle`` defaults to True for ``train``; ``seed`` fixes the order (and the noise, a std in
    [0, 1], and any augmentation); ``limit`` keeps the first N samples, as a recipe's
    ``data.train_limit``. ``noise_space`` and ``augment`` (``{"crop_padding": 4, "flip": True}``)
    are a recipe's ``data.noise_space`` and ``data.augment``, validated with the same messages.
    """
    check_noise_space(noise_space)
    augment = augment_options(augment)
    spec = registries().datasets.get(dataset)
    check_augment(augment.crop_padding, augment.flip, spec.shape)  # before the data is loaded
    images, labels = load_split(spec, split, data_root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    shuffle = split == "train" if shuffle is None else shuffle
    return Batches(BatchStream(spec, images, labels, batch_size=batch_size, shuffle=shuffle, seed=seed,
                               noise=noise, noise_seed=seed, device=resolve_device(str(device)),
                               noise_space=noise_space, crop_padding=augment.crop_padding, flip=augment.flip))


def augment_options(augment: AugmentConfig | dict[str, Any] | None) -> AugmentConfig:
    """``batches``' ``augment`` as a checked :class:`AugmentConfig` (None: both off)."""
    if augment is None:
        return AugmentConfig()
    if isinstance(augment, AugmentConfig):
        augment = to_plain(augment)
    problems = Problems()
    config = build(AugmentConfig, augment, "augment", problems)
    if problems:
        raise RecipeError("batches", problems.items)
    return config


def describe_network(network: Network) -> dict[str, Any]:
    """What :func:`save` records of a network: enough to check that a file fits another instance."""
    return {
        "blocks": [
            {"name": name, "objective": {"name": block.spec.name, **to_plain(block.spec.config)},
             "inputs": block.inputs, "detach": block.detach, "freeze": block.freeze}
            for name, block in network.blocks.items()
        ],
        "input_shape": list(network.input_shape),
        "num_classes": network.num_classes,
    }


def save(network: Network, path: str | Path) -> Path:
    """Write a network's weights to a safetensors file with its blocks' names and objectives
    (and its recipe, when it was built from one, so :func:`load_model` can rebuild it)."""
    if not isinstance(network, Network):
        raise LayerwiseError(f"save: expected a layerwise.Network, found {type(network).__name__}")
    if not network.materialized:
        raise LayerwiseError("save: the network has not seen an input yet, so some of its weights do not exist; "
                             "train it, run a batch through it, or build it with input_shape=...")
    metadata = {NETWORK_KEY: json.dumps(describe_network(network))}
    recipe = getattr(network, "recipe", None)
    if recipe is not None:
        metadata.update({"layerwise.recipe": json.dumps(recipe.to_dict()), "epoch": "0", "metrics": "{}"})
    path = Path(path)
    save_network(path, network, metadata)
    return path


def load_weights(network: Network, path: str | Path) -> Network:
    """Load a file written by :func:`save` (or a run's checkpoint) into a freshly built instance
    of the same network; every block, objective and tensor is checked, and what does not match
    is named."""
    weights = find_weights(path)
    tensors, metadata = read_safetensors(weights, "safetensors checkpoint")
    saved = saved_network(weights, metadata)
    if saved is not None:
        problems = network_differences(saved, network)
        if problems:
            raise CheckpointError(f"{weights}: was saved from another network: " + "; ".join(problems[:5]))
        shape = saved["input_shape"]
    else:  # a run's checkpoint: its recipe's dataset gives the input shape (from the metadata just read)
        shape = dataset_spec(embedded_recipe(weights, metadata_json(weights, metadata, "layerwise.recipe"))).shape
    if not network.materialized:
        network.materialize(shape)
    copy_weights(network, tensors, weights)
    return network


def saved_network(path: Path, metadata: dict[str, str]) -> dict | None:
    """The network description a file carries (None for a file without one), checked for shape."""
    if NETWORK_KEY not in metadata:
        return None
    try:
        saved = json.loads(metadata[NETWORK_KEY])
        names = [block["name"] for block in saved["blocks"]]
        objectives = [block["objective"]["name"] for block in saved["blocks"]]
        shape = [int(s) for s in saved["input_shape"]]
    except (ValueError, RecursionError, KeyError, TypeError):
        raise CheckpointError(f"{path}: its '{NETWORK_KEY}' metadata is not a network description") from None
    if not all(isinstance(n, str) for n in names + objectives):
        raise CheckpointError(f"{path}: its '{NETWORK_KEY}' metadata is not a network description")
    return {"names": names, "objectives": objectives, "input_shape": shape}


def network_differences(saved: dict, network: Network) -> list[str]:
    """How ``network`` differs from the saved description: blocks, their order and objectives."""
    names = list(network.blocks)
    if names != saved["names"]:
        return [f"it has blocks {', '.join(saved['names'])}; this network has {', '.join(names)}"]
    problems = [f"block '{name}' was trained by '{was}', here it has '{network.blocks[name].spec.name}'"
                for name, was in zip(names, saved["objectives"], strict=True) if network.blocks[name].spec.name != was]
    if network.materialized and list(network.input_shape) != saved["input_shape"]:
        problems.append(f"it takes inputs of shape {tuple(saved['input_shape'])}, this network "
                        f"{network.input_shape}")
    return problems
