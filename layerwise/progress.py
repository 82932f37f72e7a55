"""Rich progress bars and tables, on stderr so that stdout stays clean for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

stderr = Console(stderr=True)
stdout = Console()


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


def epoch_table(history: list[dict]) -> Table:
    """Per epoch: accuracies and the global loss, then one sub-row per local block with its
    loss and nHSIC terms (long format, so deep all-local networks still fit a terminal)."""
    table = Table(title="Training", header_style="bold")
    for column in ("epoch", "train acc", "test acc", "global loss", "block", "local loss", "nHSIC(Z,X)", "nHSIC(Z,Y)"):
        table.add_column(column, justify="left" if column == "block" else "right")
    for row in history:
        head = [str(row["epoch"]), f"{row['train_acc']:.2%}", f"{row['test_acc']:.2%}", f"{row['global_loss']:.4f}"]
        blocks = row["blocks"] or {"-": {}}
        for i, (block, metrics) in enumerate(blocks.items()):
            cells = [fmt(metrics.get(key)) for key in ("loss", "hsic_zx", "hsic_zy")]
            table.add_row(*(head if i == 0 else [""] * 4), block, *cells, end_section=i == len(blocks) - 1)
    return table


def fmt(value: float | None) -> str:
    """A metric to 4 significant digits, or blank when the objective does not report it."""
    return "" if value is None else f"{value:.4g}"
