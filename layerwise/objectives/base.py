"""The objective contract that built-in and third-party objectives share.

An objective is an ``nn.Module`` subclass with a class-level ``name``, a ``Config``
dataclass (checked like the rest of the recipe) and ``loss(z, ctx) -> (loss, metrics)``.
Modules it owns, such as an auxiliary classifier, are trained by its block's optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class BlockInfo:
    """What an objective may need when it is built: shapes exclude the batch dimension."""

    block_name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    num_classes: int


class KernelCache:
    """Memoises per-batch tensors (such as the input and label Gram matrices) across blocks."""

    def __init__(self) -> None:
        self._store: dict[Any, torch.Tensor] = {}

    def get(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Return the tensor cached under ``key``, computing it on first request."""
        if key not in self._store:
            self._store[key] = compute()
        return self._store[key]

    def __len__(self) -> int:
        return len(self._store)


@dataclass
class LossContext:
    """Everything a local loss may read about the current batch.

    ``x`` is the network's input batch as the network saw it (noise included), ``y`` the
    integer labels. ``kernels`` is shared by every block of the batch. ``streams`` holds the
    block's output for each extra stream of the network (:mod:`layerwise.streams`), with
    gradients into the block; ``block`` is the block itself, so an objective can run it on
    another input with gradients (``ctx.block(other)``).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    block_input: torch.Tensor | None = None
    kernels: KernelCache = field(default_factory=KernelCache)
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
    block: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        """The device of the batch (and of the model)."""
        return self.x.device

    def y_onehot(self) -> torch.Tensor:
        """One-hot labels in the input's dtype, computed once per batch."""
        return self.kernels.get(
            "y_onehot",
            lambda: nn.functional.one_hot(self.y, self.num_classes).to(self.x.dtype),
        )


@dataclass
class EmptyConfig:
    """Config of an objective that takes no options."""


class Objective(nn.Module):
    """Base class for objectives. Subclasses set ``name``, ``Config`` and ``loss``.

    ``local`` is False only for ``none``: such a block is trained by the global loss.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    local: ClassVar[bool] = True
    # The StreamMaker class whose streams loss() reads from ctx.streams (layerwise.streams), or None.
    # A network with such an objective carries that maker's streams, with its default options
    # unless the recipe's model.streams (or Network(streams=...)) configures it.
    streams: ClassVar[type | None] = None

    def __init__(self, config: Any, info: BlockInfo):
        super().__init__()
        self.config = config
        self.info = info

    def loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The block's local loss on its output ``z``, and detached metrics to log."""
        raise NotImplementedError

    def nonfinite_hint(self) -> str:
        """The likely cause, for the error shown when this objective's loss becomes NaN or infinite."""
        return "a learning rate too high for this block (lower optim.local.lr)"


class Backprop(Objective):
    """``none`` (alias ``backprop``): the block is trained by the global cross-entropy."""

    name = "none"
    local = False
