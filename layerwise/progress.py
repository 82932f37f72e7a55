"""Rich progress bars and tables, on stderr so that stdout stays clean for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class PipeFriendlyConsole(Console):
    """A console that leaves long lines whole when its output is not a terminal.

    Piped or redirected, rich assumes 80 columns and breaks longer lines with real newlines,
    even inside a word, so a path in a log was cut in two ("Report: .../noise-20261201-063" on one
    line, "623.json" on the next) and could no longer be copied or grepped. Soft wrap leaves line
    breaking to whatever shows the text. On a terminal, rich's word wrapping is kept. Tables still
    fit the width: they lay out their own cells. The check is made at each print, since the file
    behind the console can change (test runners and redirections inside a process replace sys.stdout).

    Emoji codes stay as written: rich would turn the ``:x:`` of ``--sort noise:x: expected ...``, or
    of a run's name, into an emoji in errors and tables.

    The width follows ``$COLUMNS`` at each print too. Rich fixes the width when the console is made
    (at import) if ``$COLUMNS`` is set then, and keeps it: under pytest-xdist, whose workers had
    ``COLUMNS=80`` here, a test that set it wider still got tables cut at 80 columns. (In Jupyter
    rich's own width is kept.)
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("emoji", False)
        super().__init__(*args, **kwargs)
        if kwargs.get("width") is None and not self.is_jupyter:
            self._width = None  # rich's size then reads $COLUMNS (or the terminal) when it is asked

    @property
    def soft_wrap(self) -> bool:
        return self._soft_wrap or not self.is_terminal

    @soft_wrap.setter
    def soft_wrap(self, value: bool) -> None:
        self._soft_wrap = value


stderr = PipeFriendlyConsole(stderr=True)
stdout = PipeFriendlyConsole()


def progress_bar(enabled: bool = True) -> Progress:
    """A progress display for epochs and batches (hidden when ``enabled`` is False)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not enabled,
    )


# Column titles for metric keys that deserve a better one than the key itself.
# Spaces let a narrow terminal (or an 80-column pipe) wrap a title instead of cutting it off.
METRIC_TITLES = {"loss": "local loss", "acc": "local acc", "hsic_zx": "nHSIC (Z,X)", "hsic_zy": "nHSIC (Z,Y)"}


def metric_keys(history: list[dict]) -> list[str]:
    """Every metric any block reports, ``loss`` first, then in order of first appearance.

    Objectives choose their own metrics (a plugin's ``acc``, nhsic's ``hsic_zx``), so the
    table's columns come from the data rather than from a fixed list.
    """
    keys = {"loss": None}
    for row in history:
        for metrics in row["blocks"].values():
            keys.update(dict.fromkeys(metrics))
    return list(keys)


def epoch_table(history: list[dict]) -> Table:
    """Per epoch: accuracies and the global loss, then one sub-row per local block with its
    loss and other metrics (long format, so deep all-local networks still fit a terminal)."""
    table = Table(title="Training", header_style="bold")
    keys = metric_keys(history)
    # A pipeline's epochs (layerwise.pipeline) also say each stage's training time, on its first block's row.
    staged = any("stage_seconds" in row for row in history)
    for column in ("epoch", "train acc", "test acc", "global loss", "block", *(METRIC_TITLES.get(k, k) for k in keys),
                   *(["stage: s busy"] if staged else [])):
        table.add_column(column, justify="left" if column == "block" else "right")
    for row in history:
        head = [str(row["epoch"]), f"{row['train_acc']:.2%}", f"{row['test_acc']:.2%}", f"{row['global_loss']:.4f}"]
        blocks = row["blocks"] or {"-": {}}
        times = stage_times(row) if staged else {}
        for i, (block, metrics) in enumerate(blocks.items()):
            cells = [fmt(metrics.get(key), percent=key == "acc") for key in keys]
            cells += [times.get(block, "")] if staged else []
            table.add_row(*(head if i == 0 else [""] * 4), block, *cells, end_section=i == len(blocks) - 1)
    return table


def stage_times(row: dict) -> dict[str, str]:
    """'1: 12.3s 81%' (stage, training seconds, share of them busy rather than waiting on its
    neighbours), keyed by the first block of each stage of a pipeline's epoch record."""
    times = {}
    for index, (blocks, wall, busy) in enumerate(zip(row.get("stages", []), row.get("stage_seconds", []),
                                                     row.get("stage_busy_seconds", []), strict=False)):
        first = next((b for b in blocks if b in row["blocks"]), None)
        if first is not None:
            times[first] = f"{index}: {wall:.1f}s {busy / wall:.0%}" if wall else str(index)
    return times


def fmt(value: float | None, percent: bool = False) -> str:
    """A metric to 4 significant digits, or blank when the objective does not report it.

    An accuracy (``percent``) is shown as the train and test accuracies beside it are, as a
    percentage, so that 0.93 is not read as 0.93%.
    """
    if value is None:
        return ""
    return f"{value:.2%}" if percent else f"{value:.4g}"
