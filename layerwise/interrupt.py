"""Ctrl-C during training: finish the current batch, then stop with a resumable run folder.

While :class:`StopOnInterrupt` is active, the first SIGINT only sets a flag. The training loop
reads it before each batch and after each epoch's checkpoint, and stops there; the last
complete epoch is on disk, so ``layerwise train --resume RUN`` continues from it (a partial
epoch is redone). A second SIGINT raises ``KeyboardInterrupt`` at once, for a run that does
not reach a batch boundary soon; atomic writes still leave only whole files behind.
"""

from __future__ import annotations

import signal
import threading

from layerwise.progress import stderr


class StopOnInterrupt:
    """Context manager that turns the first Ctrl-C into ``requested = True``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        # Signal handlers can only be installed from the main thread; elsewhere Ctrl-C keeps
        # its default behaviour (KeyboardInterrupt, still turned into a resumable stop).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        stderr.print("[yellow]Ctrl-C: stopping at the next batch boundary (press again to stop at once)[/]")

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
