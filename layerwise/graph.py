"""The graph executor: blocks wired by name, evaluated in dependency order.

A :class:`Network` is a list of :class:`Block` s. Each block holds a module (any
``nn.Module``, or a function of its input shape that builds one, which is how recipes build
layers) and the objective that trains it. A block reads the previous block's output unless it
names ``inputs`` (several inputs are concatenated along the feature/channel axis). A block with
``detach: true`` receives its input detached, which stops the global gradient there.

Shapes are inferred by a dry run once the network knows its input shape (given, or taken from
the first batch it sees), so neither a recipe nor a Python user states input widths, and
``nn.LazyLinear`` and friends work. Objectives are built then, since they may size helper
modules by their block's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.objectives.base import Backprop, BlockInfo, EmptyConfig, Objective
from layerwise.registry import did_you_mean
from layerwise.streams import StreamInfo, StreamMaker, StreamSpec, check_streams, default_spec
from layerwise.topology import INPUT, block_inputs, topological_order

OnOutput = Callable[..., torch.Tensor]
"""``(block name, block input, block output) -> tensor passed on``; on a network with streams,
a fourth argument holds the block's output for each stream (see :meth:`Network.run`)."""

BodyFactory = Callable[[tuple], nn.Module]
"""A function from a block's input shape (batch excluded) to its module."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective chosen and configured but not yet built: building needs its block's shapes.

    Made by ``layerwise.objective(name, **options)`` (validated like a recipe's) or from a
    recipe block; ``config`` is the objective's validated ``Config`` instance.
    """

    name: str
    cls: type
    config: Any

    @property
    def local(self) -> bool:
        """True when the objective, not the global loss, trains its block."""
        return self.cls.local

    def build(self, info: BlockInfo) -> Objective:
        """The objective module for a block of the given shapes."""
        return self.cls(self.config, info)


BACKPROP = ObjectiveSpec("none", Backprop, EmptyConfig())
"""The default objective: the block is trained by the global loss."""


class Block(nn.Module):
    """One block of a network: a module, the objective that trains it, and how it is wired.

    ``module`` is any ``nn.Module`` (lazy modules included), or a function of the block's
    input shape returning one. ``objective`` comes from ``layerwise.objective(...)``; None
    means ``none``, training by the global loss. ``inputs`` names the blocks (or ``"input"``)
    it reads, by default the block before it. ``where`` names the block in error messages.
    """

    def __init__(self, name: str, module: nn.Module | BodyFactory, objective: ObjectiveSpec | None = None, *,
                 inputs: Sequence[str] | None = None, detach: bool = False, freeze: bool = False,
                 where: str | None = None):
        super().__init__()
        if not isinstance(name, str) or not name:
            raise LayerwiseError(f"a block's name must be a non-empty string, found {name!r}")
        self.name = name
        self.where = where or f"block '{name}'"
        if isinstance(module, nn.Module):
            self.body: nn.Module | None = module
            self.make_body: BodyFactory | None = None
        elif callable(module) and not isinstance(module, type):
            self.body, self.make_body = None, module
        else:
            raise LayerwiseError(f"{self.where}: expected an nn.Module instance (or a function of the input shape "
                                 f"that returns one), found {module!r}")
        if objective is None:
            objective = BACKPROP
        if not isinstance(objective, ObjectiveSpec):
            raise LayerwiseError(f"{self.where}: objective must come from layerwise.objective(name, **options), "
                                 f"found {objective!r}")
        self.spec = objective
        if inputs is not None and (isinstance(inputs, str) or not all(isinstance(i, str) for i in inputs)):
            raise LayerwiseError(f"{self.where}: inputs must be a list of block names, found {inputs!r}")
        self.inputs = list(inputs) if inputs else None
        self.detach = bool(detach)
        self.freeze = bool(freeze)
        self.objective: Objective | None = None  # built by Network.materialize

    @property
    def local(self) -> bool:
        """True when a local objective, not the global loss, trains this block."""
        return self.spec.local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def extra_repr(self) -> str:
        wiring = f", inputs={self.inputs}" if self.inputs else ""
        flags = "".join(f", {flag}=True" for flag in ("detach", "freeze") if getattr(self, flag))
        return f"name={self.name!r}, objective={self.spec.name!r}{wiring}{flags}"


@dataclass
class GraphOutput:
    """Every block's input and output from one forward pass, and the head's logits."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    logits: torch.Tensor | None  # None for a pipeline stage without the head
    # Stream name -> block name -> that block's output on the stream (layerwise.streams).
    streams: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One input from several: concatenation along the feature/channel axis."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


class Network(nn.Module):
    """A network of blocks; ``model(x)`` returns the last block's logits.

    ``input_shape`` (batch excluded) builds every shape-dependent part now; without it, that
    happens on the first batch (:meth:`materialize`). ``num_classes`` defaults to the width of
    the last block, the head. ``name`` prefixes error messages (a recipe's name, say).

    ``streams`` (a :class:`~layerwise.streams.StreamSpec`, a recipe's ``model.streams``) makes
    the network carry extra streams beside the data; without it, the maker that the blocks'
    objectives need (``Objective.streams``), if any, with its default options.
    """

    def __init__(self, blocks: Sequence[Block], input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, *, name: str = "network", streams: StreamSpec | None = None):
        super().__init__()
        self.name = name
        blocks = list(blocks)
        check_blocks(blocks, name)
        self.stream_spec = stream_spec(blocks, streams, name)
        self.stream_maker: StreamMaker | None = None  # built by materialize
        self.deps = block_inputs((block.name, block.inputs) for block in blocks)
        check_inputs(blocks, self.deps, name)
        try:
            self.order = topological_order(self.deps)
        except LayerwiseError as exc:
            raise LayerwiseError(f"{name}: {exc}") from None
        # How many blocks read each output: fixed by the graph, so counted once, not per batch.
        self.reader_counts = {block: 0 for block in (INPUT, *self.order)}
        for sources in self.deps.values():
            for src in sources:
                self.reader_counts[src] += 1
        self.head = blocks[-1].name
        by_name = {block.name: block for block in blocks}
        self.blocks = nn.ModuleDict({block: by_name[block] for block in self.order})
        self.num_classes = num_classes
        self.input_shape: tuple[int, ...] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        if input_shape is not None:
            self.materialize(input_shape)

    @property
    def materialized(self) -> bool:
        """True once every block's module and objective exist (see :meth:`materialize`)."""
        return self.input_shape is not None

    def materialize(self, input_shape: Sequence[int], device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Network:
        """Build what depends on shapes: modules given as functions, lazy modules' weights (by a
        dry run on zeros of ``device`` and ``dtype``), and the objectives.

        Objectives are built block by block when ``num_classes`` is known, so random draws
        happen in block order; otherwise after every shape is known, the head's width giving
        the class count.
        """
        input_shape = tuple(int(s) for s in input_shape)
        if self.materialized:
            if input_shape != self.input_shape:
                raise LayerwiseError(f"{self.name}: was built for inputs of shape {self.input_shape}, "
                                     f"found {input_shape}")
            return self
        shapes: dict[str, tuple[int, ...]] = {INPUT: input_shape}
        pending = []
        for name in self.order:
            block = self.blocks[name]
            try:
                in_shape = merged_shape([shapes[src] for src in self.deps[name]])
                if block.body is None:
                    block.body = call_factory(block.make_body, in_shape)
                out_shape = dry_run(block.body, in_shape, device, dtype)
            except LayerwiseError as exc:
                raise LayerwiseError(f"{self.name}: {block.where}: {exc}") from None
            shapes[name] = out_shape
            if self.num_classes is None:
                pending.append(name)
            else:
                self.build_objective(block, shapes, input_shape)
        head_shape = shapes[self.head]
        if self.num_classes is None:
            if len(head_shape) != 1 or head_shape[0] < 2:
                raise LayerwiseError(f"{self.name}: the head block '{self.head}' (the last block) must output one "
                                     f"score per class, a flat shape (C,) with C >= 2; found {head_shape}")
            self.num_classes = head_shape[0]
            for name in pending:
                self.build_objective(self.blocks[name], shapes, input_shape)
        elif head_shape != (self.num_classes,):
            raise LayerwiseError(
                f"{self.name}: the head block '{self.head}' (the last block) outputs shape {head_shape}, but the "
                f"dataset has {self.num_classes} classes: set its out to {self.num_classes}")
        if self.stream_spec is not None:
            maker = self.stream_spec.build(StreamInfo(input_shape, self.num_classes))
            self.stream_maker = maker.to(device) if device is not None else maker
        for block in self.blocks.values():
            if block.freeze:
                block.requires_grad_(False)
        self.shapes, self.input_shape = shapes, input_shape
        self.train(self.training)  # puts frozen blocks in eval mode, so their statistics never move
        return self

    def build_objective(self, block: Block, shapes: dict[str, tuple[int, ...]], input_shape: tuple[int, ...]) -> None:
        """Build ``block``'s objective for its shapes; its errors name the block."""
        in_shape = merged_shape([shapes[src] for src in self.deps[block.name]])
        info = BlockInfo(block.name, in_shape, shapes[block.name], input_shape, self.num_classes)
        try:
            objective = block.spec.build(info)
        except LayerwiseError as exc:
            raise LayerwiseError(f"{self.name}: {block.where}.objective ({block.spec.name}): {exc}") from None
        weight = next(block.body.parameters(), None)  # helper modules follow their block's device
        block.objective = objective if weight is None else objective.to(weight.device)

    @property
    def device(self) -> torch.device:
        """Where the weights are: the first initialised parameter's device (the CPU before a lazy
        network has seen its first batch)."""
        # Meta parameters are blocks a pipeline stage does not hold (layerwise.pipeline).
        return next((p.device for p in self.parameters()
                     if not isinstance(p, nn.parameter.UninitializedTensorMixin) and p.device.type != "meta"),
                    torch.device("cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores for a batch ``x``: the head's logits, unless the stream maker predicts."""
        if not self.materialized:
            self.materialize(x.shape[1:], x.device, x.dtype)
        if self.stream_maker is not None:
            scores = self.stream_maker.predict(self, x)
            if scores is not None:
                return scores
        return self.run(x).logits

    def make_streams(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """This batch's extra streams (empty without a stream maker), made without gradient."""
        if not self.materialized:
            self.materialize(x.shape[1:], x.device, x.dtype)
        if self.stream_maker is None:
            return {}
        with torch.no_grad():
            return check_streams(self.stream_maker.make(x, y, self), self.stream_maker, x)

    def run(self, x: torch.Tensor, on_output: OnOutput | None = None, *, blocks: Sequence[str] | None = None,
            given: dict[str, torch.Tensor] | None = None, streams: dict[str, torch.Tensor] | None = None
            ) -> GraphOutput:
        """Run every block in order.

        ``on_output(name, block_input, block_output)``, when given, sees each block's output as
        soon as it exists (the trainer trains local blocks there) and returns the tensor to pass
        on. Outputs are then dropped as soon as their last reader has run, so memory need not
        grow with depth; ``inputs`` and ``outputs`` of the result stay empty.

        ``streams`` (:meth:`make_streams`) are carried through the same blocks, one forward per
        stream; each enters every block detached, so no loss on a stream reaches an earlier
        block. With streams, ``on_output`` gets a fourth argument: ``{stream: block output}``.

        ``blocks`` runs only those blocks (in evaluation order: a pipeline stage's), reading the
        outputs of earlier blocks from ``given``; ``logits`` is then None unless the head ran.
        """
        if not self.materialized:
            self.materialize(x.shape[1:], x.device, x.dtype)
        values = {INPUT: x, **(given or {})}
        side = {stream: {INPUT: tensor} for stream, tensor in (streams or {}).items()}
        readers_left = dict(self.reader_counts)
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        stream_outputs: dict[str, dict[str, torch.Tensor]] = {stream: {} for stream in side}
        for name in self.order if blocks is None else blocks:
            block = self.blocks[name]
            value = merge([values[src] for src in self.deps[name]])
            if block.detach:
                value = value.detach()
            out = block(value)
            outs = {stream: block(merge([held[src] for src in self.deps[name]]).detach())
                    for stream, held in side.items()}
            if on_output is None:
                inputs[name], outputs[name] = value, out
                for stream, tensor in outs.items():
                    stream_outputs[stream][name] = tensor
            else:
                out = on_output(name, value, out, outs) if side else on_output(name, value, out)
                for src in self.deps[name]:
                    readers_left[src] -= 1
                    if readers_left[src] == 0 and src != self.head:
                        del values[src]
                        for held in side.values():
                            del held[src]
            values[name] = out
            for stream, tensor in outs.items():  # entering the next block detached anyway: free its graph now
                side[stream][name] = tensor if on_output is None else tensor.detach()
        return GraphOutput(inputs, outputs, values.get(self.head), stream_outputs)

    def global_gradient_blocks(self) -> set[str]:
        """Blocks whose output the global gradient must flow through: those on a path from a
        trainable ``none`` block to the head that no ``detach`` cuts."""
        reaches_head = {self.head}
        for name in reversed(self.order):
            if name in reaches_head and not self.blocks[name].detach:
                reaches_head.update(self.deps[name])
        fed_by_global: set[str] = set()
        for name in self.order:
            block = self.blocks[name]
            upstream = not block.detach and any(src in fed_by_global for src in self.deps[name])
            if upstream or (not block.local and not block.freeze):
                fed_by_global.add(name)
        return reaches_head & fed_by_global

    def train(self, mode: bool = True) -> Network:
        """Train mode everywhere except frozen blocks, whose batch-norm statistics must not move."""
        super().train(mode)
        for block in self.blocks.values():
            if block.freeze:
                block.eval()
        return self

    def local_blocks(self) -> list[Block]:
        """Blocks trained by their own objective, in evaluation order, frozen ones excluded."""
        return [self.blocks[n] for n in self.order if self.blocks[n].local and not self.blocks[n].freeze]

    def global_parameters(self, blocks: Collection[str] | None = None) -> list[nn.Parameter]:
        """Parameters the global loss trains: those of unfrozen ``none`` blocks (of ``blocks`` only,
        when given: a pipeline stage's)."""
        return [
            p
            for n in self.order
            if not self.blocks[n].local and not self.blocks[n].freeze and (blocks is None or n in blocks)
            for p in self.blocks[n].parameters()
        ]


def stream_spec(blocks: list[Block], declared: StreamSpec | None, network: str) -> StreamSpec | None:
    """The streams a network carries: ``declared``, else those its objectives need; an error when
    two objectives need different makers, or the declared maker is not the one an objective reads."""
    needed = {}
    for block in blocks:
        maker = getattr(block.spec.cls, "streams", None)
        if maker is not None:
            needed.setdefault(maker.name, (maker, block))
    if declared is not None:
        for maker_name, (_, block) in needed.items():
            if maker_name != declared.name:
                raise LayerwiseError(f"{network}: {block.where}: objective '{block.spec.name}' reads the streams of "
                                     f"'{maker_name}', but the network's streams are '{declared.name}'")
        return declared
    if len(needed) > 1:
        first, second = [block for _, block in needed.values()][:2]
        raise LayerwiseError(f"{network}: {second.where}: objective '{second.spec.name}' needs other streams than "
                             f"{first.where}'s; one network carries the streams of one maker")
    return default_spec(next(iter(needed.values()))[0]) if needed else None


def check_blocks(blocks: list[Block], network: str) -> None:
    """Blocks are :class:`Block` s with unique names that can key an ``nn.ModuleDict``."""
    if not blocks:
        raise LayerwiseError(f"{network}: a network needs at least one block")
    seen: set[str] = set()
    for block in blocks:
        if not isinstance(block, Block):
            raise LayerwiseError(f"{network}: expected layerwise.Block items, found {type(block).__name__}")
        name = block.name
        if name == INPUT:
            raise LayerwiseError(f"{network}: {block.where}: '{INPUT}' is reserved: it names the network's input")
        if "." in name or hasattr(nn.ModuleDict(), name):
            raise LayerwiseError(f"{network}: {block.where}: '{name}' cannot name a module (a '.' or an attribute "
                                 f"of torch.nn.ModuleDict); choose another name")
        if name in seen:
            raise LayerwiseError(f"{network}: {block.where}: block name '{name}' is used twice")
        seen.add(name)


def check_inputs(blocks: list[Block], deps: dict[str, list[str]], network: str) -> None:
    """Every input a block names is another block or the network's input."""
    names = [block.name for block in blocks]
    for block in blocks:
        for source in deps[block.name]:
            if source != INPUT and source not in deps:
                raise LayerwiseError(f"{network}: {block.where}: inputs: unknown block '{source}'"
                                     f"{did_you_mean(source, names + [INPUT])}")


def call_factory(factory: BodyFactory, in_shape: tuple[int, ...]) -> nn.Module:
    """The module a factory builds for ``in_shape``, or an error saying it built none."""
    module = factory(in_shape)
    if not isinstance(module, nn.Module):
        raise LayerwiseError(f"its module function returned {type(module).__name__}, not an nn.Module")
    return module


def merged_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Shape after :func:`merge`, or an error when the inputs cannot be concatenated."""
    if len(shapes) == 1:
        return shapes[0]
    rest = {s[1:] for s in shapes}
    if len(rest) != 1 or any(len(s) == 0 for s in shapes):
        raise LayerwiseError(f"inputs of shapes {shapes} cannot be concatenated along the first axis")
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def module_place(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of a module's first initialised parameter or buffer, if any."""
    for tensor in (*module.parameters(), *module.buffers()):
        if not isinstance(tensor, nn.parameter.UninitializedTensorMixin) and tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def dry_run(module: nn.Module, in_shape: tuple[int, ...], device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[int, ...]:
    """Output shape (without batch) of ``module`` on a zero input of ``in_shape``, made on
    ``device``/``dtype`` or else where the module's own weights are (lazy modules get theirs
    here)."""
    own_device, own_dtype = module_place(module)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *in_shape, device=own_device or device, dtype=own_dtype or dtype))
    except (RuntimeError, ValueError, TypeError, OverflowError, IndexError) as exc:
        # TypeError and OverflowError: sizes past 64 bits, e.g. a padding of 2**62 on the meta device.
        raise LayerwiseError(f"cannot take an input of shape {in_shape}: {str(exc).splitlines()[0]}") from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise LayerwiseError(f"its module returned {type(out).__name__}, not a tensor")
    if out.numel() == 0 or math.prod(out.shape[1:]) == 0:
        raise LayerwiseError(f"input of shape {in_shape} leaves an empty output {tuple(out.shape[1:])}")
    return tuple(out.shape[1:])
