"""Run docs/workflow.md's commands on real MNIST and keep their outputs for the docs to quote.

The workflow: tune a recipe on validation accuracy, train the chosen configuration with three
seeds (one with TensorBoard), evaluate them with noise, compare them, probe one of them and draw
its probe and information-plane figures. Every command runs as a user types it, in a scratch
folder; its output goes to docs/results/workflow/NN-name.txt and the figures to
docs/results/figures/, where `python benchmarks/sync_docs.py` copies them into docs/workflow.md.

    python benchmarks/workflow.py            # about 6 minutes on one CPU thread
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "results" / "workflow"
FIGURES = REPO / "docs" / "results" / "figures"
RECIPE = "mnist_hybrid"
# Smaller than the shipped recipe's runs so the whole workflow takes minutes: 20,000 training images
# (the last 10,000 of them held out for validation while tuning) and 3 epochs.
DATA = ["data.train_limit=20000", "train.epochs=3"]
SIGMA = "model.subnetworks.sn1.blocks.hsic1.objective.sigma"
SEARCH = ["-p", f"{SIGMA}=choice:5,10,20", "-p", "optim.local.lr=log:3e-4..3e-3", "--trials", "4"]


def layerwise(args: list[str], cwd: Path, name: str | None, env: dict) -> str:
    """Run ``layerwise ARGS`` in ``cwd``; keep its output as docs/results/workflow/NAME.txt."""
    command = "layerwise " + " ".join(shlex.quote(a) for a in args)
    print(f"$ {command}", flush=True)
    done = subprocess.run([sys.executable, "-m", "layerwise", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if name is not None:
        (OUT / f"{name}.txt").write_text(f"$ {command}\n{done.stdout}")
    return done.stdout


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1", "LAYERWISE_DATA": os.environ.get(
        "LAYERWISE_DATA", str(Path.home() / ".cache" / "layerwise" / "data"))}
    with tempfile.TemporaryDirectory(prefix="layerwise-workflow-") as scratch:
        work = Path(scratch) / "work"
        work.mkdir()
        (Path(scratch) / "shared").symlink_to(REPO.parent / "shared")  # ../shared/data, as beside the repo
        found = json.loads(layerwise(["tune", RECIPE, *DATA, "data.validation=10000", *SEARCH,
                                      "--storage", "sqlite:///tune.db", "--json"], work, None, env))
        layerwise(["tune", RECIPE, *DATA, "data.validation=10000", *SEARCH, "--storage", "sqlite:///tune.db"],
                  work, "01-tune", env)  # the finished study again: its table, as a user sees it
        best = next(t for t in found["trials"] if t["number"] == found["best"])
        chosen = [f"{key}={value}" for key, value in best["params"].items()]
        for seed in (0, 1, 2):
            extra = ["--tensorboard"] if seed == 0 else []
            layerwise(["train", RECIPE, *DATA, *chosen, f"seed={seed}", "--no-progress", *extra], work,
                      f"02-train-seed{seed}" if seed == 0 else None, env)
            layerwise(["eval", "runs/latest", "--noise", "0,0.5", "--no-progress"], work,
                      "03-eval-seed0" if seed == 0 else None, env)
        layerwise(["compare", "runs/mnist_hybrid-*", "runs/tune-mnist_hybrid/*", "--sort", "best_val_acc"],
                  work, "04-compare", env)
        runs = sorted((work / "runs").glob("mnist_hybrid-*"))
        layerwise(["probe", str(runs[0].relative_to(work)), "--no-progress"], work, "05-probe", env)
        layerwise(["plot", str(runs[0].relative_to(work)), "--probes", "--out", "figures"], work, None, env)
        shutil.copyfile(work / "figures" / "probes.png", FIGURES / "workflow-probes.png")
        plane = next((work / "figures").glob("infoplane-*.png"))
        shutil.copyfile(plane, FIGURES / "workflow-infoplane.png")
        (OUT / "tensorboard-files.txt").write_text(
            "\n".join(sorted(str(p.relative_to(runs[0])) for p in (runs[0] / "tb").rglob("*") if p.is_file())) + "\n")
    print(f"wrote {OUT} and {FIGURES}/workflow-*.png")


if __name__ == "__main__":
    main()
