"""From recipes to networks: the one place where a recipe, the plugins' registries and a
dataset's shape meet.

:mod:`layerwise.recipe` validates recipes against registries it is given; this module gives
it the loaded plugins' ones, resolves shipped recipe names, and builds the :class:`Network`
that a recipe declares. The CLI, training, evaluation, checkpoints, benchmarks and tests all
build models here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from layerwise import recipe as recipes
from layerwise.data import DatasetSpec
from layerwise.errors import RecipeError
from layerwise.graph import Block, Network, ObjectiveSpec
from layerwise.layers import build_body
from layerwise.plugins import registries
from layerwise.recipe import Recipe, block_paths, named_config, objective_config
from layerwise.schema import Problems
from layerwise.shipped import resolve_recipe_path
from layerwise.streams import StreamSpec


def load_recipe(source: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe: a YAML path or the name of a shipped recipe, plus
    ``key=value`` overrides; raises :class:`~layerwise.errors.RecipeError` listing every problem."""
    path = source if isinstance(source, Path) else resolve_recipe_path(str(source))
    return recipes.load_recipe(path, list(overrides), registries=registries())


def parse_recipe(data: Any, source: str, overrides: Sequence[str] = ()) -> Recipe:
    """Validate recipe data already parsed (from a checkpoint's metadata, or built in Python)."""
    return recipes.parse_recipe(data, source, list(overrides), registries=registries())


def dataset_spec(recipe: Recipe) -> DatasetSpec:
    """The recipe's dataset: its shape, class count and loader."""
    return registries().datasets.get(recipe.data.dataset)


def recipe_blocks(recipe: Recipe) -> list[Block]:
    """The recipe's blocks, each with a function that builds its layers once its input shape is known."""
    regs = registries()
    paths = block_paths(recipe)
    blocks = []
    for cfg in recipe.model.blocks():
        config = cfg.objective_config
        if config is None:  # a block made or copied (dataclasses.replace) without validation
            problems = Problems(context=regs)
            config = objective_config(cfg.objective, f"{paths[cfg.name]}.objective", regs.objectives, problems)
            if problems:
                raise RecipeError(recipe.name, problems.items)
        objective = ObjectiveSpec(cfg.objective_name, regs.objectives.get(cfg.objective_name), config)
        make = functools.partial(build_body, cfg, regs.layers.get(cfg.layer))
        blocks.append(Block(cfg.name, make, objective, inputs=cfg.inputs, detach=cfg.detach, freeze=cfg.freeze,
                            where=f"{paths[cfg.name]} ('{cfg.name}')"))
    return blocks


def recipe_streams(recipe: Recipe) -> StreamSpec | None:
    """The stream maker the recipe's ``model.streams`` declares (or that its objectives read), if any."""
    model = recipe.model
    if model.streams is None:
        return None
    config = model.streams_config
    if config is None:  # a model made or copied without validation
        problems = Problems(context=registries())
        config = named_config(model.streams, "model.streams", registries().streams, problems, "a stream maker")
        if problems:
            raise RecipeError(recipe.name, problems.items)
    return StreamSpec(model.streams_name, registries().streams.get(model.streams_name), config)


def network_from_recipe(recipe: Recipe, input_shape: Sequence[int] | None = None,
                        num_classes: int | None = None) -> Network:
    """The recipe's network for inputs of ``input_shape`` (default: its dataset's), with
    torch's current random state; the network keeps its recipe as ``.recipe``."""
    if input_shape is None or num_classes is None:
        spec = dataset_spec(recipe)
        input_shape = spec.shape if input_shape is None else input_shape
        num_classes = spec.num_classes if num_classes is None else num_classes
    network = Network(recipe_blocks(recipe), input_shape, num_classes, name=recipe.name,
                      streams=recipe_streams(recipe))
    network.recipe = recipe
    return network


def build_on_meta(recipe: Recipe, input_shape: Sequence[int] | None = None, num_classes: int | None = None) -> Network:
    """The network on PyTorch's meta device: every shape is inferred and every parameter counted,
    but nothing is allocated, so checking a recipe with absurd widths costs no memory or time."""
    with torch.device("meta"):
        return network_from_recipe(recipe, input_shape, num_classes)


def build_model(recipe: Recipe, device: torch.device | str = "cpu") -> Network:
    """The recipe's network with the weights its training starts from (seeded by ``recipe.seed``),
    leaving the caller's random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        network = network_from_recipe(recipe)
    return network.to(device)
