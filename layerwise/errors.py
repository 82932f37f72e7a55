"""Exceptions for mistakes a user can fix.

The CLI prints a :class:`LayerwiseError` as one red line and exits with code 2; anything
else is a bug in layerwise and keeps its traceback.
"""

from __future__ import annotations


def printable(text: str, keep_newlines: bool = True) -> str:
    """``text`` with terminal escapes and other unprintable characters written as Python escapes
    (newlines kept unless ``keep_newlines`` is False). Error messages quote names from recipes and
    checkpoints that may come from strangers; printed raw, an escape sequence would drive the
    terminal (retitle it, recolour it, hide text)."""
    return "".join(c if c.isprintable() or (keep_newlines and c == "\n") else repr(c)[1:-1] for c in text)


class LayerwiseError(Exception):
    """A user-facing error: the message alone must say what is wrong and how to fix it."""


class RecipeError(LayerwiseError):
    """A recipe (or an override) that is not valid; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            text = f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)


class DataError(LayerwiseError):
    """A dataset that cannot be found or read."""


class CheckpointError(LayerwiseError):
    """A checkpoint or run folder that is missing, corrupt or does not match its recipe."""


class NonFiniteError(LayerwiseError):
    """A loss or metric became NaN or infinite; the message names the block, objective and likely cause."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training; the message says what was saved and how to resume.

    Not a ``KeyboardInterrupt``: typer would swallow that into a silent exit. The CLI prints
    the message and exits with code 130, as for any Ctrl-C.
    """
