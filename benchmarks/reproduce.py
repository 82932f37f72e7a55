"""Reproduce the hybrid HSIC/backprop paper and its baselines as named, resumable studies.

Each study is a list of jobs (a shipped recipe, overrides and a seed). A job trains through
the same code as ``layerwise train``, evaluates its checkpoint under test noise, and is recorded
in ``docs/results/<study>.json`` as soon as it finishes, so an interrupted study resumes where it
stopped (finished jobs are skipped). ``docs/results/<study>.md`` is rewritten from the JSON.

    python benchmarks/reproduce.py accuracy                  # MNIST, Fashion-MNIST, CIFAR-10 x 3 methods x 3 seeds
    python benchmarks/reproduce.py noise                     # the paper's Tables II and III, for all 3 methods
    python benchmarks/reproduce.py sensitivity               # sigma x beta grid, scored on a validation split
    python benchmarks/reproduce.py conv                      # a small conv net on CIFAR-10, hybrid and backprop
    python benchmarks/reproduce.py accuracy --tiny           # 1 epoch on 1,000 samples: a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerwise.atomic import write_text_atomic
from layerwise.checkpoint import WEIGHTS_FILE
from layerwise.factory import load_recipe
from layerwise.noise_eval import evaluate_noise
from layerwise.progress import progress_bar
from layerwise.runs import cpu_name
from layerwise.shipped import shipped_recipes
from layerwise.train_run import train_recipe

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
SWEEP = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0]
METHODS = {"hybrid": "mnist_hybrid", "hsic": "mnist_hsic", "backprop": "mnist_backprop"}
DATASETS = ("mnist", "fashion_mnist", "cifar10")
HSIC_BLOCKS = ("model.subnetworks.sn1.blocks.hsic1", "model.subnetworks.sn2.blocks.hsic2")


@dataclass
class Job:
    """One training run of a study."""

    key: str
    recipe: str
    overrides: list[str]
    labels: dict
    eval_noise: list[float] = field(default_factory=lambda: list(SWEEP))


def method_recipe(method: str, dataset: str) -> tuple[str, list[str]]:
    """The recipe for a method on a dataset: the shipped one if it exists, else MNIST's retargeted."""
    name = f"{dataset}_{method}"
    if name in shipped_recipes():
        return name, []
    return METHODS[method], [f"data.dataset={dataset}", f"name={name}"]


def accuracy_jobs(seeds: list[int]) -> list[Job]:
    """Study 1: three methods on three datasets, several seeds, each evaluated over the noise sweep."""
    jobs = []
    for dataset in DATASETS:
        for method in METHODS:
            recipe, overrides = method_recipe(method, dataset)
            for seed in seeds:
                jobs.append(Job(f"{dataset}/{method}/seed{seed}", recipe, overrides + [f"seed={seed}"],
                                {"dataset": dataset, "method": method, "seed": seed}))
    return jobs


def noise_jobs(seeds: list[int]) -> list[Job]:
    """Study 2 (Table II): train and test with the same noise std, for every method on MNIST."""
    jobs = []
    for train_noise in (0.05, 0.5, 0.8):
        for method in METHODS:
            recipe, overrides = method_recipe(method, "mnist")
            for seed in seeds:
                jobs.append(Job(f"noise{train_noise}/{method}/seed{seed}", recipe,
                                overrides + [f"seed={seed}", f"data.train_noise={train_noise}"],
                                {"train_noise": train_noise, "method": method, "seed": seed},
                                eval_noise=[train_noise]))
    return jobs


def sensitivity_jobs(seeds: list[int]) -> list[Job]:
    """Study 4: nHSIC sigma x beta on the MNIST hybrid, scored on 10,000 held-out training samples."""
    jobs = []
    for sigma in (2.0, 5.0, 10.0, 20.0):
        for beta in (20.0, 100.0, 500.0):
            settings = [f"{block}.objective.{key}={value}" for block in HSIC_BLOCKS
                        for key, value in (("sigma", sigma), ("beta", beta))]
            for seed in seeds:
                jobs.append(Job(f"sigma{sigma:g}/beta{beta:g}/seed{seed}", "mnist_hybrid",
                                settings + [f"seed={seed}", "data.validation=10000"],
                                {"sigma": sigma, "beta": beta, "seed": seed}, eval_noise=[0.0]))
    return jobs


def conv_jobs(seeds: list[int]) -> list[Job]:
    """A small conv network on CIFAR-10, hybrid against backprop (the issue's "better with a conv recipe")."""
    return [Job(f"cifar10/conv_{method}/seed{seed}", f"cifar10_conv_{method}", [f"seed={seed}"],
                {"dataset": "cifar10", "method": f"conv {method}", "seed": seed})
            for method in ("hybrid", "backprop") for seed in seeds]


STUDIES = {"accuracy": accuracy_jobs, "noise": noise_jobs, "sensitivity": sensitivity_jobs, "conv": conv_jobs}


def run_job(job: Job, extra: list[str], runs_dir: Path) -> dict:
    """Train and evaluate one job; return its record."""
    recipe = load_recipe(shipped_recipes()[job.recipe], job.overrides + extra)
    started = time.perf_counter()
    run = train_recipe(recipe, runs_dir, show_progress=False, quiet=True)
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    report = evaluate_noise(run / WEIGHTS_FILE, job.eval_noise, show_progress=False)
    return {
        **job.labels,
        "recipe": job.recipe,
        "overrides": job.overrides + extra,
        "epochs": recipe.train.epochs,
        "test_acc": history[-1]["test_acc"],
        "val_acc": history[-1].get("val_acc"),
        "test_acc_by_epoch": [row["test_acc"] for row in history],
        "noise": {f"{row['noise']:g}": row["acc"] for row in report["results"]},
        "train_seconds": round(sum(row["train_seconds"] for row in history), 1),
        "wall_seconds": round(wall, 1),
        "run": str(run.relative_to(REPO) if run.is_relative_to(REPO) else run),
    }


def mean_std(values: list[float]) -> str:
    """'98.12 ± 0.05' (percent), or one value when there is one seed."""
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def group(records: dict, *keys: str) -> dict[tuple, list[dict]]:
    """Records grouped by the values of ``keys``, in insertion order."""
    groups: dict[tuple, list[dict]] = {}
    for record in records.values():
        groups.setdefault(tuple(record[k] for k in keys), []).append(record)
    return groups


def accuracy_markdown(records: dict) -> list[str]:
    lines = ["| dataset | method | epochs | seeds | test acc % | noise 0.5 (clean train) % | train time / run |",
             "|---|---|---|---|---|---|---|"]
    for (dataset, method), rows in group(records, "dataset", "method").items():
        lines.append(f"| {dataset} | {method} | {rows[0]['epochs']} | {len(rows)} | "
                     f"{mean_std([r['test_acc'] for r in rows])} | {mean_std([r['noise']['0.5'] for r in rows])} | "
                     f"{statistics.mean(r['train_seconds'] for r in rows):.0f} s |")
    lines += ["", "Test accuracy against test-noise std (clean training; mean over seeds, %):", "",
              "| dataset | method | " + " | ".join(f"{s:g}" for s in SWEEP) + " |",
              "|---|---|" + "---|" * len(SWEEP)]
    for (dataset, method), rows in group(records, "dataset", "method").items():
        cells = [f"{100 * statistics.mean(r['noise'][f'{s:g}'] for r in rows):.2f}" for s in SWEEP]
        lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + " |")
    return lines


def noise_markdown(records: dict) -> list[str]:
    lines = ["| train and test noise std | method | seeds | test acc % |", "|---|---|---|---|"]
    for (noise, method), rows in group(records, "train_noise", "method").items():
        lines.append(f"| {noise:g} | {method} | {len(rows)} | {mean_std([r['test_acc'] for r in rows])} |")
    return lines


def sensitivity_markdown(records: dict) -> list[str]:
    lines = ["| sigma | beta | seeds | validation acc % | test acc % |", "|---|---|---|---|---|"]
    for (sigma, beta), rows in group(records, "sigma", "beta").items():
        lines.append(f"| {sigma:g} | {beta:g} | {len(rows)} | {mean_std([r['val_acc'] for r in rows])} | "
                     f"{mean_std([r['test_acc'] for r in rows])} |")
    return lines


def accuracy_figures(records: dict, out: Path) -> list[Path]:
    """Per dataset: mean test accuracy per epoch, and against test-noise std, one curve per method."""
    from layerwise.plot import draw

    written = []
    for dataset in dict.fromkeys(r["dataset"] for r in records.values()):
        curves, sweeps = {}, {}
        for (_, method), rows in group({k: r for k, r in records.items() if r["dataset"] == dataset},
                                       "dataset", "method").items():
            epochs = range(1, len(rows[0]["test_acc_by_epoch"]) + 1)
            curves[method] = (list(epochs),
                              [statistics.mean(r["test_acc_by_epoch"][e - 1] for r in rows) for e in epochs])
            sweeps[method] = (SWEEP, [statistics.mean(r["noise"][f"{s:g}"] for r in rows) for s in SWEEP])
        written.append(draw(curves, out / f"accuracy-{dataset}.png", "epoch",
                            f"{dataset}: test accuracy per epoch (mean over seeds)"))
        written.append(draw(sweeps, out / f"noise-{dataset}.png", "test noise std (pixel space, clean training)",
                            f"{dataset}: robustness to Gaussian noise"))
    return written


FIGURES = {"accuracy": accuracy_figures}
ONE_SEED = ("sensitivity", "conv")  # studies whose default is seed 0 only, to fit a CPU session

RENDERERS = {"accuracy": accuracy_markdown, "noise": noise_markdown, "sensitivity": sensitivity_markdown,
             "conv": accuracy_markdown}


def write_results(study: str, out: Path, state: dict) -> None:
    """The study's JSON (the resume state) and its Markdown table."""
    write_text_atomic(out / f"{study}.json", json.dumps(state, indent=2) + "\n")
    machine = state["machine"]
    header = [f"# Study: {study}", "",
              f"Command: `{state['command']}`", "",
              f"Machine: {machine['cpu']}, {machine['threads']} torch thread(s), device {machine['device']}, "
              f"torch {machine['torch']}. Wall time of all jobs: {state['total_seconds'] / 60:.1f} min.", ""]
    body = RENDERERS[study](state["records"]) if state["records"] else ["(no finished jobs yet)"]
    write_text_atomic(out / f"{study}.md", "\n".join(header + body) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a reproduction study; finished jobs are skipped on rerun.")
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (sensitivity, conv: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--only", default="", help="run only jobs whose key starts with this, e.g. mnist/hybrid")
    parser.add_argument("--tiny", action="store_true", help="1 epoch on 1,000 samples, to check the code")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings comparable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "studies")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.study in ONE_SEED else [0, 1, 2])
    extra = ["train.device=cpu"]
    if args.epochs:
        extra.append(f"train.epochs={args.epochs}")
    if args.tiny:
        extra += ["train.epochs=1", "data.train_limit=1000"]
    jobs = [job for job in STUDIES[args.study](seeds) if job.key.startswith(args.only)]
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / f"{args.study}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"records": {}, "total_seconds": 0.0}
    command = argv if argv is not None else __import__("sys").argv[1:]
    state["command"] = "python benchmarks/reproduce.py " + " ".join(command)
    state["machine"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": "cpu",
                        "torch": torch.__version__}
    # Tables follow the study's own order (dataset, method, seed), however the jobs were resumed.
    order = [job.key for job in STUDIES[args.study](seeds)]
    state["records"] = dict(sorted(state["records"].items(),
                                   key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    todo = [job for job in jobs if job.key not in state["records"]]
    with progress_bar() as bars:
        task = bars.add_task(f"{args.study}: {len(jobs) - len(todo)} of {len(jobs)} done", total=len(jobs),
                             completed=len(jobs) - len(todo))
        for job in todo:
            bars.update(task, description=f"{args.study}: {job.key}")
            held_out = args.tiny and any(o.startswith("data.validation=") for o in job.overrides)
            record = run_job(job, extra + (["data.validation=200"] if held_out else []), args.runs_dir)
            state["records"][job.key] = record
            state["total_seconds"] += record["wall_seconds"]
            write_results(args.study, args.out, state)
            bars.advance(task)
    write_results(args.study, args.out, state)
    if args.study in FIGURES and state["records"]:
        for path in FIGURES[args.study](state["records"], args.out / "figures"):
            print(f"Wrote {path}")
    print((args.out / f"{args.study}.md").read_text())


if __name__ == "__main__":
    main()
