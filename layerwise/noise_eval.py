"""Robustness evaluation: test accuracy under Gaussian input noise of several strengths.

By default noise follows the hybrid paper's protocol: std ``sigma`` in [0, 1] pixel space, added
before normalisation, clipped to [0, 1], seeded per sample so every run sees the same noisy test
set. ``noise_space="normalized"`` adds the same per-sample noise after normalisation, unclipped
(the authors' published notebook); the report records the space, and such reports are saved
under names of their own (``noise-normalized-*.json``), so that the two are never mixed:
``compare`` and ``plot`` show each space apart (:func:`layerwise.runs.read_noise_report`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from layerwise.atomic import write_text_atomic
from layerwise.checkpoint import model_from_checkpoint
from layerwise.data import BatchStream, DatasetSpec, check_noise_space, load_split
from layerwise.errors import LayerwiseError
from layerwise.factory import dataset_spec
from layerwise.graph import Network
from layerwise.progress import progress_bar
from layerwise.runs import check_writable, report_prefix
from layerwise.trainer import evaluate


def parse_noise_levels(text: str) -> list[float]:
    """``"0,0.05,0.5"`` -> ``[0.0, 0.05, 0.5]``; clean accuracy (0) is always included, first."""
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise LayerwiseError(f"--noise: expected numbers in [0, 1] separated by commas, "
                                 f"found '{part.strip()}'") from None
    return noise_levels(values, "--noise")


def noise_levels(values, where: str) -> list[float]:
    """Sorted distinct noise stds with 0 first, each checked to lie in [0, 1]; ``where`` names
    the option or argument in the error."""
    levels = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            # repr, not :g, so that 1.0000001 is not shown as the valid-looking 1
            raise LayerwiseError(f"{where}: each std must be in [0, 1], found {value!r}")
        levels.append(float(value))
    return sorted(set([0.0, *levels]))


def evaluate_noise(
    checkpoint: str | Path,
    levels: list[float],
    data_root: str | Path | None = None,
    device: str = "cpu",
    noise_seed: int = 0,
    batch_size: int = 1000,
    show_progress: bool = True,
    noise_space: str = "pixel",
) -> dict:
    """Test accuracy of the checkpoint at each noise std, as a JSON-ready report.

    ``noise_space`` is where the test noise goes (``pixel`` or ``normalized``), whatever the
    space the run was trained in (its ``train_noise_space`` in the report)."""
    check_noise_space(noise_space)
    graph, ckpt = model_from_checkpoint(checkpoint, device)
    results = noise_results(graph, dataset_spec(ckpt.recipe), levels, data_root, device, noise_seed, batch_size,
                            show_progress, noise_space)
    return {
        "checkpoint": str(ckpt.path),
        "recipe": ckpt.recipe.name,
        "dataset": ckpt.recipe.data.dataset,
        "train_noise": ckpt.recipe.data.train_noise,
        "train_noise_space": ckpt.recipe.data.noise_space,
        "epoch": ckpt.epoch,
        "noise_space": noise_space,
        "noise_seed": noise_seed,
        "device": str(device),
        "torch": torch.__version__,
        "results": results,
    }


def noise_results(
    graph: Network,
    spec: DatasetSpec,
    levels: list[float],
    data_root: str | Path | None = None,
    device: torch.device | str = "cpu",
    noise_seed: int = 0,
    batch_size: int = 1000,
    show_progress: bool = True,
    noise_space: str = "pixel",
) -> list[dict]:
    """``{"noise", "acc", "loss"}`` of ``graph`` on the test split of ``spec``, per noise std
    added in ``noise_space`` (``pixel`` or ``normalized``)."""
    check_noise_space(noise_space)
    images, labels = load_split(spec, "test", data_root)
    results = []
    with progress_bar(show_progress) as bars:
        for sigma in levels:
            stream = BatchStream(spec, images, labels, batch_size=batch_size, shuffle=False, seed=0,
                                 noise=sigma, noise_seed=noise_seed, device=device, noise_space=noise_space)
            task = bars.add_task(f"noise {sigma:g}", total=len(stream))
            metrics = evaluate(graph, stream, on_batch=lambda task=task: bars.advance(task))
            results.append({"noise": sigma, "acc": metrics["acc"], "loss": metrics["loss"]})
    return results


def check_report_folder(eval_dir: Path) -> None:
    """Fail in one line, before anything is computed, when the report could not be written."""
    if eval_dir.exists() and not eval_dir.is_dir():
        raise LayerwiseError(f"{eval_dir}: exists but is not a folder, so no evaluation report can be written there")
    check_writable(eval_dir if eval_dir.is_dir() else eval_dir.parent)


def write_report(report: dict, eval_dir: Path) -> Path:
    """Save the report under the run's ``eval/`` folder, named by time so reports accumulate
    (``noise-<time>.json`` and ``noise-latest.json``; ``noise-normalized-...`` for that space)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    prefix = report_prefix(report.get("noise_space", "pixel"))
    path = eval_dir / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(report, indent=2) + "\n"
    write_text_atomic(path, text)
    write_text_atomic(eval_dir / f"{prefix}-latest.json", text)
    return path
