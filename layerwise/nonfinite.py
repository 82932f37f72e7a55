"""Catch the first NaN or infinite value of a training run and say where it came from.

Every batch, the trainer hands over one scalar per watched quantity, in causal order: each
block's largest absolute output (in evaluation order), then each local block's loss and
metrics, then the global cross-entropy. The first one that is not finite names the culprit:
a block whose output blew up (its weights went bad), else an objective whose loss did (for
example a kernel sigma so small that the kernel is NaN), else the head's cross-entropy.

``train.on_nonfinite`` chooses what happens:
- ``stop`` (default): raise :class:`NonFiniteError` naming the block, the objective, the
  batch and the likely cause. Nothing is saved, so the last good checkpoint stays.
- ``skip``: do not step the optimizers on that batch, count it, and go on.

Cost on a GPU: reading a device value on the host waits for all queued work, which would
stall the GPU every batch. On the CPU that read is free, so every batch is checked before
the optimizers step. On a GPU in ``stop`` mode, the watch instead keeps the first bad batch's
values in a device tensor (device ops only) and reads it every :data:`GPU_CHECK_EVERY`
batches and at the end of the epoch. By then the optimizers may have stepped on a few bad
batches; that is harmless, because the run stops without saving them. ``skip`` must decide
before stepping, so it reads the flag every batch on any device (it is opt-in).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from layerwise.errors import NonFiniteError

GPU_CHECK_EVERY = 50
"""Batches between host reads of the non-finite flag on a GPU in ``stop`` mode."""

Key = tuple[str, str]
"""What a watched value is: ``(block name, metric)``, with metric ``output`` for a block's output."""


class NonFiniteWatch:
    """Checks each batch's watched values; see the module docstring for when and at what cost."""

    def __init__(
        self,
        mode: Literal["stop", "skip"],
        device: torch.device,
        explain: Callable[[Key, dict[Key, float]], tuple[str, str]],
        check_every: int | None = None,
    ):
        self.mode = mode
        # (first bad key, every watched value of that batch) -> (what it is, its likely cause)
        self.explain = explain
        if check_every is None:
            check_every = 1 if device.type == "cpu" or mode == "skip" else GPU_CHECK_EVERY
        if mode == "skip" and check_every != 1:
            raise ValueError("skip mode must check every batch: it decides before the optimizers step")
        self.check_every = check_every
        self.start_epoch(None)

    def start_epoch(self, epoch: int | None) -> None:
        """Reset the per-epoch counters (``epoch`` only labels messages)."""
        self.epoch = epoch
        self.batch = 0
        self.skipped = 0
        self._first: torch.Tensor | None = None  # values of the first bad batch (deferred mode)
        self._first_batch: torch.Tensor | None = None
        self._seen_bad: torch.Tensor | None = None
        self._counter: torch.Tensor | None = None
        self._keys: list[Key] = []

    def allows_step(self, keys: list[Key], values: torch.Tensor, now: bool = False) -> bool:
        """True when the optimizers may step on this batch, False when it is to be skipped.

        Raises :class:`NonFiniteError` in ``stop`` mode, at once or within ``check_every`` batches.
        ``now`` forces an immediate check (an objective already synced to find a bad value).
        """
        self.batch += 1
        if now:
            self.flush()  # an earlier bad batch, if any, is the one to report
        if self.check_every == 1 or now:
            if bool(torch.isfinite(values).all()):
                return True
            if self.mode == "skip":
                self.skipped += 1
                return False
            raise self.error(self.batch, keys, values)
        self._remember_first_bad(keys, values)
        if self.batch % self.check_every == 0:
            self.flush()
        return True

    def _remember_first_bad(self, keys: list[Key], values: torch.Tensor) -> None:
        """Device-only bookkeeping: keep the values and index of the first batch with a bad value."""
        bad = ~torch.isfinite(values).all()
        if self._first is None:
            self._first, self._seen_bad = values.clone(), bad
            self._counter = torch.ones((), dtype=torch.long, device=values.device)
            self._first_batch = self._counter.clone()
        else:
            take = bad & ~self._seen_bad
            self._counter += 1
            self._first = torch.where(take, values, self._first)
            self._first_batch = torch.where(take, self._counter, self._first_batch)
            self._seen_bad |= bad
        self._keys = keys

    def flush(self) -> None:
        """Read the deferred flag (one host sync) and raise if a bad batch was seen."""
        if self._seen_bad is not None and bool(self._seen_bad):
            raise self.error(int(self._first_batch), self._keys, self._first)

    def finish_epoch(self, batches: int) -> None:
        """End-of-epoch checks: the deferred flag, and an epoch whose every batch was skipped."""
        self.flush()
        if batches and self.skipped == batches:
            raise NonFiniteError(
                f"{self.where()}every one of the {batches} batches had a NaN or infinite value and was skipped "
                f"(train.on_nonfinite: skip); set train.on_nonfinite=stop to see which block is the cause"
            )

    def where(self, batch: int | None = None) -> str:
        """'epoch E, batch B: ' for messages."""
        parts = [f"epoch {self.epoch}" if self.epoch is not None else "", f"batch {batch}" if batch else ""]
        text = ", ".join(p for p in parts if p)
        return f"{text}: " if text else ""

    def error(self, batch: int, keys: list[Key], values: torch.Tensor) -> NonFiniteError:
        """The error for the first non-finite entry of ``values``."""
        host = values.detach().float().cpu().tolist()
        index = next(i for i, value in enumerate(host) if not math.isfinite(value))
        what, cause = self.explain(keys[index], dict(zip(keys, host, strict=True)))
        return NonFiniteError(f"{self.where(batch)}{what} became {host[index]}; likely cause: {cause}")
