"""The graph executor: blocks wired by name, evaluated in dependency order.

Each block reads the previous block's output unless it names ``inputs`` (several inputs are
concatenated along the feature/channel axis). A block with ``detach: true`` receives its input
detached, which stops the global gradient there. Shapes are inferred from the dataset by a
dry run, so a recipe states only output widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.objectives.base import BlockInfo, Objective
from layerwise.recipe import BlockConfig, Recipe, block_paths, objective_config
from layerwise.schema import Problems

INPUT = "input"

OnOutput = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(block name, block input, block output) -> tensor passed on`` (see :meth:`Graph.forward`)."""


def block_inputs(blocks: list[BlockConfig]) -> dict[str, list[str]]:
    """Block name -> the names it reads; by default the block declared before it."""
    deps: dict[str, list[str]] = {}
    previous = INPUT
    for block in blocks:
        deps[block.name] = list(block.inputs) if block.inputs else [previous]
        previous = block.name
    return deps


def topological_order(deps: dict[str, list[str]]) -> list[str]:
    """Names in an order where every block follows its inputs; ties keep declaration order."""
    order: list[str] = []
    done = {INPUT}
    pending = list(deps)
    while pending:
        ready = [name for name in pending if all(src in done for src in deps[name])]
        if not ready:
            raise LayerwiseError(f"the blocks {', '.join(pending)} form a cycle through their 'inputs'")
        for name in ready:
            order.append(name)
            done.add(name)
        pending = [name for name in pending if name not in done]
    return order


class Block(nn.Module):
    """A layer (with optional batch-norm and activation) and the objective that trains it."""

    def __init__(self, config: BlockConfig, body: nn.Module, objective: Objective):
        super().__init__()
        self.config = config
        self.body = body
        self.objective = objective

    @property
    def local(self) -> bool:
        """True when a local objective, not the global loss, trains this block."""
        return self.objective.local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@dataclass
class GraphOutput:
    """Every block's input and output from one forward pass, and the head's logits."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    logits: torch.Tensor


def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One input from several: concatenation along the feature/channel axis."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


class Graph(nn.Module):
    """A network built from a recipe, for a dataset of shape ``input_shape``."""

    def __init__(self, recipe: Recipe, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        from layerwise.plugins import registries

        regs = registries()
        configs = {block.name: block for block in recipe.model.blocks()}
        paths = block_paths(recipe)
        self.deps = block_inputs(recipe.model.blocks())
        self.order = topological_order(self.deps)
        # How many blocks read each output: fixed by the graph, so counted once, not per batch.
        self.reader_counts = {name: 0 for name in (INPUT, *self.order)}
        for sources in self.deps.values():
            for src in sources:
                self.reader_counts[src] += 1
        self.head = recipe.model.blocks()[-1].name
        self.blocks = nn.ModuleDict()
        shapes: dict[str, tuple[int, ...]] = {INPUT: tuple(input_shape)}
        for name in self.order:
            cfg = configs[name]
            try:
                in_shape = merged_shape([shapes[src] for src in self.deps[name]])
                body = build_body(cfg, in_shape, regs.layers.get(cfg.layer))
                out_shape = dry_run(body, in_shape)
            except LayerwiseError as exc:
                raise LayerwiseError(f"{recipe.name}: {paths[name]} ('{name}'): {exc}") from None
            shapes[name] = out_shape
            info = BlockInfo(name, in_shape, out_shape, tuple(input_shape), num_classes)
            problems = Problems()
            config = objective_config(cfg.objective, f"{paths[name]}.objective", regs.objectives, problems)
            if problems:
                raise LayerwiseError(f"{recipe.name}: " + "; ".join(problems.items))
            block = Block(cfg, body, regs.objectives.get(cfg.objective_name)(config, info))
            if cfg.freeze:
                block.requires_grad_(False)
            self.blocks[name] = block
        self.shapes = shapes
        self.train()  # puts frozen blocks in eval mode from the start, so their statistics never move
        if shapes[self.head] != (num_classes,):
            raise LayerwiseError(
                f"{recipe.name}: the head block '{self.head}' (the last block) outputs shape "
                f"{shapes[self.head]}, but the dataset has {num_classes} classes: set its out to {num_classes}"
            )

    def forward(self, x: torch.Tensor, on_output: OnOutput | None = None) -> GraphOutput:
        """Run every block in order.

        ``on_output(name, block_input, block_output)``, when given, sees each block's output as
        soon as it exists (the trainer trains local blocks there) and returns the tensor to pass
        on. Outputs are then dropped as soon as their last reader has run, so memory need not
        grow with depth; ``inputs`` and ``outputs`` of the result stay empty.
        """
        values = {INPUT: x}
        readers_left = dict(self.reader_counts)
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        for name in self.order:
            block = self.blocks[name]
            value = merge([values[src] for src in self.deps[name]])
            if block.config.detach:
                value = value.detach()
            out = block(value)
            if on_output is None:
                inputs[name], outputs[name] = value, out
            else:
                out = on_output(name, value, out)
                for src in self.deps[name]:
                    readers_left[src] -= 1
                    if readers_left[src] == 0 and src != self.head:
                        del values[src]
            values[name] = out
        return GraphOutput(inputs, outputs, values[self.head])

    def global_gradient_blocks(self) -> set[str]:
        """Blocks whose output the global gradient must flow through: those on a path from a
        trainable ``none`` block to the head that no ``detach`` cuts."""
        reaches_head = {self.head}
        for name in reversed(self.order):
            if name in reaches_head and not self.blocks[name].config.detach:
                reaches_head.update(self.deps[name])
        fed_by_global: set[str] = set()
        for name in self.order:
            block = self.blocks[name]
            upstream = not block.config.detach and any(src in fed_by_global for src in self.deps[name])
            if upstream or (not block.local and not block.config.freeze):
                fed_by_global.add(name)
        return reaches_head & fed_by_global

    def train(self, mode: bool = True) -> "Graph":
        """Train mode everywhere except frozen blocks, whose batch-norm statistics must not move."""
        super().train(mode)
        for block in self.blocks.values():
            if block.config.freeze:
                block.eval()
        return self

    def local_blocks(self) -> list[Block]:
        """Blocks trained by their own objective, in evaluation order, frozen ones excluded."""
        return [self.blocks[n] for n in self.order if self.blocks[n].local and not self.blocks[n].config.freeze]

    def global_parameters(self) -> list[nn.Parameter]:
        """Parameters the global loss trains: those of unfrozen ``none`` blocks."""
        return [
            p
            for n in self.order
            if not self.blocks[n].local and not self.blocks[n].config.freeze
            for p in self.blocks[n].parameters()
        ]


def build_on_meta(recipe: Recipe, input_shape: tuple[int, ...], num_classes: int) -> Graph:
    """The graph on PyTorch's meta device: every shape is inferred and every parameter counted,
    but nothing is allocated, so checking a recipe with absurd widths costs no memory or time."""
    with torch.device("meta"):
        return Graph(recipe, input_shape, num_classes)


def merged_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Shape after :func:`merge`, or an error when the inputs cannot be concatenated."""
    if len(shapes) == 1:
        return shapes[0]
    rest = {s[1:] for s in shapes}
    if len(rest) != 1 or any(len(s) == 0 for s in shapes):
        raise LayerwiseError(f"inputs of shapes {shapes} cannot be concatenated along the first axis")
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def build_body(cfg: BlockConfig, in_shape: tuple[int, ...], builder) -> nn.Module:
    """The layer, then batch-norm if ``norm`` is set, then the activation."""
    try:
        parts = [builder(cfg, in_shape)]
        if cfg.norm:
            parts.append(batch_norm_for_layer(parts[0], in_shape))
    except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
        # Sizes a recipe may ask for but PyTorch cannot honour: weights too large to allocate,
        # shapes whose element count overflows 64 bits, a zero or negative size.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerwiseError(f"cannot build its {cfg.layer} layer: {reason}") from None
    if cfg.act:
        from layerwise.layers import ACTIVATION_MODULES

        parts.append(ACTIVATION_MODULES[cfg.act]())
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def batch_norm_for_layer(layer: nn.Module, in_shape: tuple[int, ...]) -> nn.Module:
    """A batch-norm sized by the layer's output, found by a dry run."""
    from layerwise.layers import batch_norm_for

    return batch_norm_for(dry_run(layer, in_shape))


def dry_run(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape (without batch) of ``module`` on a zero input of ``in_shape``."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *in_shape))
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        # TypeError and OverflowError: sizes past 64 bits, e.g. a padding of 2**62 on the meta device.
        raise LayerwiseError(f"cannot take an input of shape {in_shape}: {str(exc).splitlines()[0]}") from None
    finally:
        module.train(was_training)
    if out.numel() == 0 or math.prod(out.shape[1:]) == 0:
        raise LayerwiseError(f"input of shape {in_shape} leaves an empty output {tuple(out.shape[1:])}")
    return tuple(out.shape[1:])
