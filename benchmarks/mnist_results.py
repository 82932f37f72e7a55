"""Train shipped recipes with their own settings and record what they reach.

Writes ``docs/results/<study>.json`` and ``docs/results/<study>.md``, which the README quotes.
Each recipe runs through the same code path as ``layerwise train`` (one run folder each under
``--runs-dir``), then ``layerwise eval``'s noise evaluation on the final checkpoint.

    python benchmarks/mnist_results.py                # the README's table (about 6 minutes, 1 thread)
    python benchmarks/mnist_results.py --epochs 1     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from layerwise.checkpoint import WEIGHTS_FILE
from layerwise.noise_eval import evaluate_noise
from layerwise.recipe import load_recipe
from layerwise.runs import cpu_name
from layerwise.shipped import shipped_recipes
from layerwise.train_run import train_recipe

REPO = Path(__file__).resolve().parent.parent


def run_one(name: str, epochs: int | None, runs_dir: Path, noise: list[float]) -> dict:
    """Train one shipped recipe, evaluate it under noise, and summarise."""
    overrides = [f"train.epochs={epochs}"] if epochs else []
    recipe = load_recipe(shipped_recipes()[name], overrides + ["train.device=cpu"])
    started = time.perf_counter()
    run = train_recipe(recipe, runs_dir, show_progress=False, quiet=True)
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    report = evaluate_noise(run / WEIGHTS_FILE, noise, show_progress=False)
    return {
        "recipe": name,
        "epochs": recipe.train.epochs,
        "seed": recipe.seed,
        "final_test_acc": history[-1]["test_acc"],
        "test_acc_by_epoch": [row["test_acc"] for row in history],
        "train_seconds": sum(row["train_seconds"] for row in history),
        "wall_seconds": round(wall, 1),
        "noise": {str(row["noise"]): row["acc"] for row in report["results"]},
        "run": str(run),
    }


def markdown(results: list[dict], machine: dict, command: str) -> str:
    """The results as a Markdown table with how they were produced."""
    noise_levels = list(results[0]["noise"])
    lines = [
        f"Produced by `{command}` on {machine['cpu']} ({machine['threads']} torch thread(s), "
        f"torch {machine['torch']}, {machine['date']}).",
        "",
        "| recipe | epochs | seed | test acc | " + " | ".join(f"noise {n}" for n in noise_levels[1:])
        + " | training time |",
        "|---|---|---|---|" + "---|" * (len(noise_levels) - 1) + "---|",
    ]
    for r in results:
        noisy = " | ".join(f"{r['noise'][n]:.2%}" for n in noise_levels[1:])
        lines.append(f"| {r['recipe']} | {r['epochs']} | {r['seed']} | {r['final_test_acc']:.2%} | {noisy} | "
                     f"{r['train_seconds']:.0f} s |")
    lines.append("")
    lines.append("Noise columns: clean training, test images with Gaussian noise of that std in [0, 1] pixel space.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["mnist_hybrid", "mnist_backprop", "mnist_hsic"])
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings comparable)")
    parser.add_argument("--study", default="mnist", help="name of the output files under docs/results/")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "benchmarks")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    noise = [0.0, 0.5]
    results = [run_one(name, args.epochs, args.runs_dir, noise) for name in args.recipes]
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    command = "python benchmarks/mnist_results.py" + (f" --epochs {args.epochs}" if args.epochs else "")
    out = REPO / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.study}.json").write_text(json.dumps({"machine": machine, "command": command,
                                                        "results": results}, indent=2) + "\n")
    (out / f"{args.study}.md").write_text(markdown(results, machine, command))
    print((out / f"{args.study}.md").read_text())


if __name__ == "__main__":
    main()
