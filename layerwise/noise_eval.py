"""Robustness evaluation: test accuracy under Gaussian input noise of several strengths.

Noise follows the hybrid paper's protocol: std ``sigma`` in [0, 1] pixel space, added before
normalisation, clipped to [0, 1], seeded per sample so every run sees the same noisy test set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from layerwise.atomic import write_text_atomic
from layerwise.checkpoint import model_from_checkpoint
from layerwise.data import BatchStream, load_split
from layerwise.errors import LayerwiseError
from layerwise.plugins import registries
from layerwise.progress import progress_bar
from layerwise.trainer import evaluate


def parse_noise_levels(text: str) -> list[float]:
    """``"0,0.05,0.5"`` -> ``[0.0, 0.05, 0.5]``; clean accuracy (0) is always included, first."""
    levels = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise LayerwiseError(f"--noise: expected numbers in [0, 1] separated by commas, found '{part.strip()}'") from None
        if not 0.0 <= value <= 1.0:
            raise LayerwiseError(f"--noise: each std must be in [0, 1] (pixel space), found {value:g}")
        levels.append(value)
    return sorted(set([0.0, *levels]))


def evaluate_noise(
    checkpoint: str | Path,
    levels: list[float],
    data_root: str | Path | None = None,
    device: str = "cpu",
    noise_seed: int = 0,
    batch_size: int = 1000,
    show_progress: bool = True,
) -> dict:
    """Test accuracy of the checkpoint at each noise std, as a JSON-ready report."""
    graph, ckpt = model_from_checkpoint(checkpoint, device)
    spec = registries().datasets.get(ckpt.recipe.data.dataset)
    images, labels = load_split(spec, "test", data_root)
    results = []
    with progress_bar(show_progress) as bars:
        for sigma in levels:
            stream = BatchStream(spec, images, labels, batch_size=batch_size, shuffle=False, seed=0,
                                 noise=sigma, noise_seed=noise_seed, device=device)
            task = bars.add_task(f"noise {sigma:g}", total=len(stream))
            metrics = evaluate(graph, stream, on_batch=lambda: bars.advance(task))
            results.append({"noise": sigma, "acc": metrics["acc"], "loss": metrics["loss"]})
    return {
        "checkpoint": str(ckpt.path),
        "recipe": ckpt.recipe.name,
        "dataset": ckpt.recipe.data.dataset,
        "train_noise": ckpt.recipe.data.train_noise,
        "epoch": ckpt.epoch,
        "noise_seed": noise_seed,
        "device": str(device),
        "torch": torch.__version__,
        "results": results,
    }


def write_report(report: dict, eval_dir: Path) -> Path:
    """Save the report under the run's ``eval/`` folder, named by time so reports accumulate."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / f"noise-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(report, indent=2) + "\n"
    write_text_atomic(path, text)
    write_text_atomic(eval_dir / "noise-latest.json", text)
    return path
