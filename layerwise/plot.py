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


def plot_runs(runs: list[Path], out: Path) -> list[Path]:
    """Write ``accuracy.png`` (and ``noise.png`` when runs have eval reports) to ``out``."""
    plt = pyplot()
    runs = [run.resolve() for run in runs]
    histories = {run: read_history(run) for run in runs}
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, history in histories.items():
        ax.plot([r["epoch"] for r in history], [100 * r["test_acc"] for r in history], marker="o", label=run.name)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    written.append(out / "accuracy.png")

    reports = {run: read_noise_report(run) for run in runs}
    reports = {run: report for run, report in reports.items() if report}
    if reports:
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, report in reports.items():
            rows = report["results"]
            ax.plot([r["noise"] for r in rows], [100 * r["acc"] for r in rows], marker="o", label=run.name)
        ax.set(xlabel="test noise std (pixel space)", ylabel="test accuracy (%)", title="Robustness to Gaussian noise")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "noise.png", dpi=120)
        plt.close(fig)
        written.append(out / "noise.png")
    return written
