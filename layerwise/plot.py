"""PNG figures of runs: test accuracy per epoch, and accuracy against test-noise std.

matplotlib is an optional extra (``pip install 'layerwise[plot]'``), imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path

from layerwise.errors import LayerwiseError


def pyplot():
    """matplotlib's pyplot on a file-only backend, or an error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise LayerwiseError("layerwise plot needs matplotlib: pip install 'layerwise[plot]'") from None
    matplotlib.use("Agg")  # no display needed: figures go to files
    import matplotlib.pyplot as plt

    return plt


def read_history(run: Path) -> list[dict]:
    """The run's per-epoch records."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise LayerwiseError(f"{run}: not a run folder (no metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_noise_report(run: Path) -> dict | None:
    """The run's latest ``layerwise eval`` report, if it has one."""
    path = run / "eval" / "noise-latest.json"
    return json.loads(path.read_text()) if path.is_file() else None


Series = dict[str, tuple[list[float], list[float]]]
"""Curves by label: (x values, y values)."""


def draw(series: Series, path: Path, xlabel: str, title: str) -> Path:
    """One figure of accuracy curves (y in [0, 1], drawn as %), saved as PNG at ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_runs(runs: list[Path], out: Path) -> list[Path]:
    """Write ``accuracy.png`` (and ``noise.png`` when runs have eval reports) to ``out``."""
    pyplot()  # fail early, before reading anything, when matplotlib is missing
    runs = [run.resolve() for run in runs]
    accuracy: Series = {}
    noise: Series = {}
    for run in runs:
        history = read_history(run)
        accuracy[run.name] = ([r["epoch"] for r in history], [r["test_acc"] for r in history])
        report = read_noise_report(run)
        if report:
            noise[run.name] = ([r["noise"] for r in report["results"]], [r["acc"] for r in report["results"]])
    written = [draw(accuracy, out / "accuracy.png", "epoch", "Test accuracy per epoch")]
    if noise:
        written.append(draw(noise, out / "noise.png", "test noise std (pixel space)", "Robustness to Gaussian noise"))
    return written
