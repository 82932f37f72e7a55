"""TensorBoard event files for a run: ``RUN/tb/``, written when the recipe sets ``train.tensorboard``.

``layerwise train RECIPE --tensorboard`` is the override ``train.tensorboard=true``, so the key is
stored in the run's ``recipe.yaml`` and ``layerwise train --resume`` keeps logging to the same folder.
After each saved epoch, :class:`TensorBoardLogger` (an epoch callback of
:func:`layerwise.train_run.train_recipe`) writes the epoch's ``metrics.jsonl`` record as scalars
at step = epoch, named by :data:`SCALAR_TAGS` (``accuracy/test``, ``loss/train``, ...) and
``blocks/<block>/<metric>`` for every block's local metrics (``blocks/hsic1/hsic_zx``, ...), then
flushes, so a run killed later loses nothing written. When it opens the folder it also writes the
recipe: its scalar values as hyper-parameters (keys flattened to override paths such as
``model.subnetworks.sn1.blocks.hsic1.objective.beta``, for the HPARAMS tab) and its whole YAML as
text (``recipe``). A resumed run appends a new event file to the same folder (TensorBoard reads
them as one run) and writes the same hyper-parameters again.

TensorBoard is an optional extra (``pip install 'layerwise[tensorboard]'``): torch's
``SummaryWriter`` needs it, and :func:`require_tensorboard` says so in one line before a run starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from layerwise.errors import LayerwiseError
from layerwise.recipe import Recipe, dump_recipe
from layerwise.runs import is_number

TB_FOLDER = "tb"
MISSING_MESSAGE = ("--tensorboard needs TensorBoard: pip install 'layerwise[tensorboard]' "
                   "(or set train.tensorboard=false)")

SCALAR_TAGS = {
    "train_acc": "accuracy/train",
    "test_acc": "accuracy/test",
    "val_acc": "accuracy/val",
    "global_loss": "loss/train",  # the head's cross-entropy, averaged over the epoch's batches
    "test_loss": "loss/test",
    "train_seconds": "time/train_seconds",
    "skipped_batches": "train/skipped_batches",
}
"""Tag of each top-level field of a metrics.jsonl record; any other numeric field keeps its own name."""


def require_tensorboard() -> None:
    """Raise a one-line :class:`LayerwiseError` naming the extra when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (it imports the tensorboard package)
    except ImportError:
        raise LayerwiseError(MISSING_MESSAGE) from None


def scalars(record: dict) -> dict[str, float]:
    """The tags and values an epoch's record is logged as (``epoch`` is the step, not a scalar)."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if key != "epoch" and is_number(value):
            values[SCALAR_TAGS.get(key, key)] = float(value)
    for block, metrics in (record.get("blocks") or {}).items():
        for metric, value in (metrics or {}).items():
            if is_number(value):
                values[f"blocks/{block}/{metric}"] = float(value)
    for group, value in (record.get("lr") or {}).items():  # with a learning-rate schedule (optim.schedule)
        if is_number(value):
            values[f"lr/{group}"] = float(value)
    return values


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested recipe data as ``{dotted.path: value}``; list items named by their ``name`` (as in
    overrides) or else by index; lists of plain values joined into one string."""
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list) and all(isinstance(item, dict) and "name" in item for item in data):
        items = [(str(item["name"]), {k: v for k, v in item.items() if k != "name"}) for item in data]
    elif isinstance(data, list) and any(isinstance(item, (dict, list)) for item in data):
        items = list(enumerate(data))
    elif isinstance(data, list):
        return {prefix: ", ".join(str(item) for item in data)}
    else:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def hyperparameters(recipe: Recipe) -> dict[str, int | float | str]:
    """The recipe's values as TensorBoard hyper-parameters: numbers and strings, booleans as ``"true"``
    and ``"false"`` (torch would log them as 1 and 0), ``None`` left out."""
    values: dict[str, int | float | str] = {}
    for key, value in flatten(recipe.to_dict()).items():
        if isinstance(value, bool):
            values[key] = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            values[key] = value
    return values


class TensorBoardLogger:
    """An epoch callback (``logger(run, record)``) writing ``run/tb/``; the writer opens on the first epoch."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.writer = None

    def __call__(self, run: Path, record: dict) -> None:
        if self.writer is None:
            self.writer = self.open(Path(run) / TB_FOLDER)
        step = int(record["epoch"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def open(self, folder: Path):
        """A ``SummaryWriter`` on ``folder``, with the recipe written as hyper-parameters and as text."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        writer = SummaryWriter(log_dir=str(folder))
        # add_hparams would make a sub-run of its own; writing its summaries here ties the
        # hyper-parameters to this run's scalars, which the HPARAMS tab then shows beside them.
        metrics = {"accuracy/test": 0.0, "loss/test": 0.0}
        if self.recipe.data.validation:
            metrics["accuracy/val"] = 0.0
        for summary in hparams(hyperparameters(self.recipe), metrics):
            writer.file_writer.add_summary(summary)
        writer.add_text("recipe", "```yaml\n" + dump_recipe(self.recipe) + "```")
        return writer

    def close(self) -> None:
        """Flush and close the event file (nothing to do if no epoch was logged)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@contextlib.contextmanager
def tensorboard_callbacks(recipe: Recipe) -> Iterator[list[TensorBoardLogger]]:
    """``[logger]`` when the recipe sets ``train.tensorboard`` (else ``[]``), closed on leaving.

    Entered before anything is created, so a missing extra fails first, in one line.
    """
    if not recipe.train.tensorboard:
        yield []
        return
    require_tensorboard()
    logger = TensorBoardLogger(recipe)
    try:
        yield [logger]
    finally:
        logger.close()
