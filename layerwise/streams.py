"""Streams: extra inputs that travel through the same blocks as the data, one forward each.

Some families of local learning cannot be written as a loss on the block's output alone:
Forward-Forward (Hinton 2022) trains every layer on a *positive* stream (the image with its
label written in) and a *negative* one (the image with a wrong label), and Signal
Propagation (Kohan et al.) sends a label-derived *signal* through the same layers as the
data. A :class:`StreamMaker` declares such streams: per batch it makes tensors shaped like
the network's input, the network carries each one through every block beside the data, and
each local objective then sees its block's output for every stream (``ctx.streams``).

Routing (docs/design.md, section 2) holds on every stream: a stream's value enters each block
detached, so a local loss reaches its own block's parameters and nothing earlier; the global
cross-entropy reads the data stream only. A stream maker may also say how the network predicts
(:meth:`StreamMaker.predict`), which ``Network.forward``, ``lw.evaluate`` and ``layerwise eval``
then use instead of the head's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.objectives.base import EmptyConfig


@dataclass(frozen=True)
class StreamInfo:
    """What a stream maker may need when it is built: the input's shape (batch excluded)."""

    input_shape: tuple[int, ...]
    num_classes: int


class StreamMaker(nn.Module):
    """Base class of stream makers. Subclasses set ``name``, ``Config``, ``names`` and ``make``.

    A stream maker is a submodule of its network, so buffers it holds (a fixed label
    projection, say) are saved in checkpoints; no optimizer trains its parameters.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    # The streams make() returns, by name: objectives read ctx.streams[name].
    names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, info: StreamInfo):
        super().__init__()
        self.config = config
        self.info = info

    def make(self, x: torch.Tensor, y: torch.Tensor, network: nn.Module) -> dict[str, torch.Tensor]:
        """This batch's streams: ``{name: tensor shaped like x}``, one per entry of ``names``.

        Called once per training batch, without gradient, before the forward pass; ``network``
        may be run (under ``torch.no_grad``) to choose hard negatives.
        """
        raise NotImplementedError

    def predict(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Class scores ``(batch, num_classes)`` for a test batch, or None to use the head's logits."""
        return None


@dataclass(frozen=True)
class StreamSpec:
    """A stream maker chosen and configured but not yet built (it needs the input's shape)."""

    name: str
    cls: type
    config: Any

    def build(self, info: StreamInfo) -> StreamMaker:
        """The stream maker for inputs of ``info.input_shape``."""
        return self.cls(self.config, info)


def default_spec(cls: type) -> StreamSpec:
    """The spec of stream maker class ``cls`` with its default options (an objective that needs
    streams names its maker's class, which a network builds when nothing else is declared)."""
    return StreamSpec(cls.name, cls, cls.Config())


def check_streams(made: Any, maker: StreamMaker, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The streams a maker returned, or a one-line error saying how they break the contract."""
    where = f"stream maker '{maker.name}'"
    if not isinstance(made, dict) or set(made) != set(maker.names):
        found = sorted(made) if isinstance(made, dict) else type(made).__name__
        raise LayerwiseError(f"{where}: make() must return a dict with the streams {list(maker.names)}, found {found}")
    for key, value in made.items():
        if not isinstance(value, torch.Tensor) or value.shape != x.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise LayerwiseError(f"{where}: stream '{key}' must be shaped like the input {tuple(x.shape)}, "
                                 f"found {shape}")
    return made
