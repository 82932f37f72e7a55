"""PNG figures of runs: test accuracy per epoch, accuracy against test-noise std (a figure per noise
space), and (``--probes``) linear-probe accuracy per block and the information plane.

matplotlib is an optional extra (``pip install 'layerwise[plot]'``), imported only here.
"""

from __future__ import annotations

import json
import math
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
    """The run's per-epoch records, every line checked (:func:`layerwise.runs.read_metrics`)."""
    from layerwise.runs import METRICS_FILE, read_metrics

    path = run / METRICS_FILE
    if not path.is_file():
        raise LayerwiseError(f"{run}: not a run folder (no {METRICS_FILE})")
    return read_metrics(path)


Series = dict[str, tuple[list[float], list[float]]]
"""Curves by label: (x values, y values)."""


def save_figure(plt, fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder made if needed) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw(series: Series, path: Path, xlabel: str, title: str) -> Path:
    """One figure of accuracy curves (y in [0, 1], drawn as %), saved as PNG at ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(plt, fig, path)


def plot_runs(runs: list[Path], out: Path) -> list[Path]:
    """Write ``accuracy.png``, and ``noise.png`` when runs have eval reports, to ``out``; runs with
    normalized-space reports (``layerwise eval --noise-space normalized``) get ``noise-normalized.png``
    too, apart: a std means another noise in each space. Every file is read and checked first."""
    from layerwise.runs import NOISE_SPACES, read_noise_report, report_prefix

    pyplot()  # fail early, before reading anything, when matplotlib is missing
    runs = [run.resolve() for run in runs]
    accuracy: Series = {}
    noise: dict[str, Series] = {space: {} for space in NOISE_SPACES}
    for run in runs:
        history = read_history(run)
        accuracy[run.name] = ([r["epoch"] for r in history], [r["test_acc"] for r in history])
        for space in NOISE_SPACES:
            report = read_noise_report(run, space)
            if report:
                results = report["results"]
                noise[space][run.name] = ([r["noise"] for r in results], [r["acc"] for r in results])
    written = [draw(accuracy, out / "accuracy.png", "epoch", "Test accuracy per epoch")]
    for space, series in noise.items():
        if series:
            title = "Robustness to Gaussian noise" + (f" ({space} space)" if space != "pixel" else "")
            written.append(draw(series, out / f"{report_prefix(space)}.png", f"test noise std ({space} space)",
                                title))
    return written


Curve = tuple[str | None, int, list[float], list[float]]
"""One line: (legend label, or None to leave it out of the legend; colour index; x values; y values)."""


def draw_curve_panels(panels: dict[str, list[Curve]], path: Path, title: str, xlabel: str = "epoch") -> Path:
    """Accuracy curves (y in [0, 1], drawn as %) in panels side by side, one per key of ``panels``
    (its y label), sharing the y axis; a colour index means the same colour in every panel.
    Saved at ``path`` (PNG, or SVG/PDF by its suffix)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for ax, (ylabel, curves) in zip(axes[0], panels.items(), strict=True):
        for label, colour, xs, ys in curves:
            ax.plot(xs, [100 * y for y in ys], marker="o", color=colours[colour % len(colours)], label=label)
        ax.set(xlabel=xlabel, ylabel=f"{ylabel} (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs: no 1.5
        ax.grid(alpha=0.3)
        if any(label for label, *_ in curves):
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(plt, fig, path)


def read_probe_report(run: Path) -> dict:
    """The run's latest ``layerwise probe`` report, or an error saying how to make one."""
    path = run / "eval" / "probe-latest.json"
    if not path.is_file():
        raise LayerwiseError(f"{run}: has no probe report ({path.relative_to(run)}); make one with: "
                             f"layerwise probe {run}")
    try:
        report = json.loads(path.read_text())
    except ValueError:
        report = None
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(row, dict) and isinstance(row.get("block"), str) and type(row.get("test_acc")) in (int, float)
            for row in rows):
        raise LayerwiseError(f"{path}: not a probe report (expected the JSON that layerwise probe writes); "
                             f"make a new one with: layerwise probe {run}")
    return report


def information_plane(history: list[dict]) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per block that logged both ``hsic_zx`` and ``hsic_zy``: (epochs, nHSIC(Z,X), nHSIC(Z,Y)), in block order."""
    curves: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for record in history:
        for block, metrics in (record.get("blocks") or {}).items():
            if isinstance(metrics, dict) and "hsic_zx" in metrics and "hsic_zy" in metrics:
                epochs, zx, zy = curves.setdefault(block, ([], [], []))
                epochs.append(record["epoch"])
                zx.append(metrics["hsic_zx"])
                zy.append(metrics["hsic_zy"])
    return curves


def epochs_to_label(count: int, most: int = 10) -> set[int]:
    """Indices of the points to label when a curve has ``count``: all up to ``most``, else about
    ``most`` evenly spaced ones, the first and the last included."""
    if count <= most:
        return set(range(count))
    step = math.ceil((count - 1) / (most - 1))
    return set(range(0, count, step)) | {count - 1}


def draw_probe_accuracy(reports: dict[str, dict], path: Path) -> Path:
    """Probe test accuracy per block, one line per run, blocks in evaluation order."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [[row["block"] for row in report["rows"]] for report in reports.values()]
    same_blocks = all(blocks == names[0] for blocks in names)
    for (label, report), blocks in zip(reports.items(), names, strict=True):
        depth = list(range(1, len(blocks) + 1))
        ax.plot(depth, [100 * row["test_acc"] for row in report["rows"]], marker="o", label=label)
        if not same_blocks:  # each run names its own blocks at its points
            for x, row in zip(depth, report["rows"], strict=True):
                ax.annotate(row["block"], (x, 100 * row["test_acc"]), textcoords="offset points", xytext=(3, 3),
                            fontsize="x-small")
    longest = max(len(blocks) for blocks in names)
    ax.set_xticks(range(1, longest + 1))
    if same_blocks:
        ax.set_xticklabels(names[0], rotation=30 if longest > 6 else 0)
    ax.set(xlabel="block (evaluation order)" if same_blocks else "block depth (evaluation order)",
           ylabel="probe test accuracy (%)", title="Linear probe on each block's features")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(plt, fig, path)


def draw_information_plane(run_name: str, history: list[dict], report: dict | None, path: Path) -> Path:
    """nHSIC(Z,X) against nHSIC(Z,Y): one line per block over the epochs the run logged (points
    labelled by epoch), and the probe's test-set values as crosses."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves = information_plane(history)
    probed = {row["block"]: row for row in (report or {}).get("rows", []) if "hsic_zx" in row and "hsic_zy" in row}
    blocks = list(probed) + [block for block in curves if block not in probed]  # the report's is evaluation order
    for index, block in enumerate(blocks):
        color = colors[index % len(colors)]
        if block in curves:
            epochs, zx, zy = curves[block]
            ax.plot(zx, zy, marker="o", markersize=3, color=color, label=f"{block} (training, per epoch)")
            for i in sorted(epochs_to_label(len(epochs))):
                ax.annotate(str(epochs[i]), (zx[i], zy[i]), textcoords="offset points", xytext=(3, 3),
                            fontsize="x-small", color=color)
        if block in probed:
            row = probed[block]
            ax.plot([row["hsic_zx"]], [row["hsic_zy"]], marker="x", markersize=8, linestyle="none", color=color,
                    label=f"{block} (test set, layerwise probe)")
    ax.set(xlabel="nHSIC(Z, X)", ylabel="nHSIC(Z, Y)", title=f"Information plane: {run_name}")
    ax.grid(alpha=0.3)
    if blocks:
        ax.legend(fontsize="x-small")
    return save_figure(plt, fig, path)


def plot_probes(runs: list[Path], out: Path) -> list[Path]:
    """Write ``probes.png`` (probe test accuracy per block, from each run's ``eval/probe-latest.json``)
    and, per run, ``infoplane-<run>.png`` (nHSIC(Z,X) against nHSIC(Z,Y) per block, over the epochs
    whose metrics.jsonl records have ``hsic_zx`` and ``hsic_zy``, with the probe's test-set points)."""
    pyplot()  # fail early, before reading anything, when matplotlib is missing
    runs = [run.resolve() for run in runs]
    histories = {run.name: read_history(run) for run in runs}
    reports = {run.name: read_probe_report(run) for run in runs}
    written = [draw_probe_accuracy(reports, out / "probes.png")]
    for name in reports:
        written.append(draw_information_plane(name, histories[name], reports[name], out / f"infoplane-{name}.png"))
    return written
