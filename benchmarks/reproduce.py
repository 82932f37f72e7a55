"""Reproduce the hybrid HSIC/backprop paper and its baselines as named, resumable studies.

Each study is a list of jobs (a shipped recipe, overrides and a seed). A job trains through
the same code as ``layerwise train``, evaluates its checkpoint under test noise, and is recorded
in ``docs/results/<study>.json`` as soon as it finishes, so an interrupted study resumes where it
stopped: finished jobs are skipped, unless their settings (the job's overrides and the command's
flags) changed since, and then they train again. ``docs/results/<study>.md`` is rewritten from the
JSON, with the records of the study's current jobs only.

    python benchmarks/reproduce.py accuracy                  # MNIST, Fashion-MNIST, CIFAR-10 x 3 methods x 3 seeds
    python benchmarks/reproduce.py noise                     # the paper's Tables II and III, for all 3 methods
    python benchmarks/reproduce.py sensitivity               # sigma x beta grid, scored on a validation split
    python benchmarks/reproduce.py conv                      # a small conv net on CIFAR-10, hybrid and backprop
    python benchmarks/reproduce.py local-select              # FF and SigProp settings on a validation split
    python benchmarks/reproduce.py local                     # FF, SigProp and backprop twins: MNIST x3, F-MNIST x1
    python benchmarks/reproduce.py accuracy --tiny           # 1 epoch on 1,000 samples: a smoke test (own --out)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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
from layerwise.recipe import objective_name
from layerwise.runs import METRICS_FILE, cpu_name, read_metrics
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
    # Where the test noise goes: "pixel" fills record["noise"], "normalized" record["noise_normalized"].
    eval_spaces: tuple[str, ...] = ("pixel",)


def method_recipe(method: str, dataset: str) -> tuple[str, list[str]]:
    """The recipe for a method on a dataset: the shipped one if it exists, else MNIST's retargeted."""
    name = f"{dataset}_{method}"
    if name in shipped_recipes():
        return name, []
    return METHODS[method], [f"data.dataset={dataset}", f"name={name}"]


def accuracy_jobs(seeds: list[int], out: Path) -> list[Job]:
    """Study 1: three methods on three datasets, several seeds, each evaluated over the noise sweep."""
    jobs = []
    for dataset in DATASETS:
        for method in METHODS:
            recipe, overrides = method_recipe(method, dataset)
            for seed in seeds:
                jobs.append(Job(f"{dataset}/{method}/seed{seed}", recipe, overrides + [f"seed={seed}"],
                                {"dataset": dataset, "method": method, "seed": seed}))
    return jobs


def noise_jobs(seeds: list[int], out: Path) -> list[Job]:
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


def sensitivity_jobs(seeds: list[int], out: Path) -> list[Job]:
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


def conv_jobs(seeds: list[int], out: Path) -> list[Job]:
    """A small conv network on CIFAR-10, hybrid against backprop (the issue's "better with a conv recipe")."""
    return [Job(f"cifar10/conv_{method}/seed{seed}", f"cifar10_conv_{method}", [f"seed={seed}"],
                {"dataset": "cifar10", "method": f"conv {method}", "seed": seed})
            for method in ("hybrid", "backprop") for seed in seeds]


# --- The published tables (issue 12): settings chosen on validation splits, then test runs ---------
#
# A "-select" study trains each candidate once (seed 0) with the last training samples held out, and
# its test study reads the winner per (dataset, method) from the select study's JSON. So the final
# settings are chosen by validation accuracy alone, by code, and the choice is written beside them.

PHSIC_DATASETS = ("mnist", "fashion_mnist", "cifar10")
PHSIC_SELECT_EPOCHS = 5
# Epochs and seeds of the test runs: fewer on the longest runs, to fit the set in one session of a 2-core CPU.
PHSIC_EPOCHS = {"mnist": 15, "fashion_mnist": 15, "cifar10": 10}
# The row of a backprop twin trained as the HSIC-only winner was (its augmentation and epochs).
PHSIC_TWIN = "backprop, trained as hsic"
# Seeds per (dataset, method), 1 unless named: the HSIC-only networks (the table's question), their
# backprop twins and the MNIST hybrid have 3.
PHSIC_SEEDS = {**{(dataset, method): 3 for dataset in PHSIC_DATASETS for method in ("hsic", "backprop")},
               ("mnist", "hybrid"): 3, ("mnist", PHSIC_TWIN): 3}
PHSIC_GROUPS = 32
# Where the 5-epoch candidates left the target out of reach (MNIST's HSIC-only network), two more
# candidates at the length of a test run, with and without augmentation; a candidate that sets its
# epochs keeps them in the test runs.
PHSIC_LONGER = {("mnist", "hsic"): 20}
HYBRID_DATASETS = ("mnist", "fashion_mnist")
HYBRID_EPOCHS = 25
# The datasets whose hybrid missed its target with the first three candidates, and the groups of the
# extra candidates (the 512- and 128-wide nHSIC layers in 16 groups of 32 and of 8 neurons).
HYBRID_MORE = ("fashion_mnist",)
HYBRID_GROUPS = 16
VALIDATION = 10000
COSINE = ["optim.schedule.name=cosine"]
# Issue 14: the plugin families (recipes DATASET_METHOD), each recipe's subnetwork and three local
# blocks, and the epochs of the select runs and of the test runs (the latter fixed by this machine's
# budget, not chosen). Settings are chosen on MNIST; Fashion-MNIST's runs use them, with fewer seeds.
LOCAL_METHODS = {"ff": ("ff", ("ff1", "ff2", "ff3")), "sigprop": ("sigprop", ("sp1", "sp2", "sp3"))}
LOCAL_SEEDS = {"mnist": 3, "fashion_mnist": 1}
LOCAL_SELECT_EPOCHS = 3
LOCAL_EPOCHS = {"ff": 30, "sigprop": 6}
LOCAL_TARGETS = {"ff": 98.0, "sigprop": 97.5}
FF_LEARNING_RATES = ("3.0e-3", "1.0e-2", "3.0e-2")


def objective_paths(recipe_name: str) -> list[str]:
    """Override paths of every block with an nHSIC objective in a shipped recipe."""
    recipe = load_recipe(shipped_recipes()[recipe_name])
    return [f"model.subnetworks.{sn.name}.blocks.{block.name}.objective"
            for sn in recipe.model.subnetworks for block in sn.blocks
            if objective_name(block.objective) == "nhsic"]


def augment_settings(dataset: str) -> list[str]:
    """Random crops with 2 pixels of padding, and flips except on digits (a mirrored digit is another)."""
    return ["data.augment.crop_padding=2"] + (["data.augment.flip=true"] if dataset != "mnist" else [])


def phsic_candidates(method: str, dataset: str) -> dict[str, list[str]]:
    """The settings tried on validation for an nHSIC method of the pHSIC network: the kernel, with
    and without grouped neurons (pHSIC's "grp": 32 groups of 32, power 0.5, delta 1), and for
    HSIC-only networks grouped neurons with augmentation."""
    paths = objective_paths(f"phsic_mnist_{method}")
    candidates = {kernel: [f"{path}.kernel={kernel}" for path in paths] for kernel in ("gaussian", "cosine")}
    for kernel in ("gaussian", "cosine"):
        grouped = candidates[kernel] + [f"{path}.groups={PHSIC_GROUPS}" for path in paths]
        candidates[f"{kernel}, {PHSIC_GROUPS} groups"] = grouped
        if method == "hsic":
            candidates[f"{kernel}, {PHSIC_GROUPS} groups, augment"] = grouped + augment_settings(dataset)
    if (dataset, method) in PHSIC_LONGER:
        # Augmentation loses at 5 epochs but may win given time: both at the length of a test run.
        epochs = PHSIC_LONGER[dataset, method]
        grouped = candidates[f"gaussian, {PHSIC_GROUPS} groups"] + [f"train.epochs={epochs}"]
        candidates[f"gaussian, {PHSIC_GROUPS} groups, {epochs} epochs"] = grouped
        candidates[f"gaussian, {PHSIC_GROUPS} groups, augment, {epochs} epochs"] = grouped + augment_settings(dataset)
    return candidates


def phsic_select_jobs(seeds: list[int], out: Path) -> list[Job]:
    """pHSIC's 3x1024 MLP: each candidate on each dataset, seed 0, scored on held-out training samples.
    The backprop twin has no nHSIC setting to choose, so it is not in this study."""
    return [Job(f"{dataset}/{method}/{name}", f"phsic_{dataset}_{method}",
                settings + COSINE + epochs_unless_set(settings, PHSIC_SELECT_EPOCHS)
                + [f"data.validation={VALIDATION}", "seed=0"],
                {"dataset": dataset, "method": method, "candidate": name, "settings": settings, "seed": 0},
                eval_noise=[0.0])
            for dataset in PHSIC_DATASETS for method in ("hsic", "hybrid")
            for name, settings in phsic_candidates(method, dataset).items()]


def training_settings(settings: list[str]) -> list[str]:
    """A candidate's settings less its model options (model.*): what a backprop twin can take."""
    return [s for s in settings if not s.startswith("model.")]


def epochs_unless_set(settings: list[str], epochs: int) -> list[str]:
    """``train.epochs=EPOCHS``, unless a candidate's ``settings`` choose the epochs themselves."""
    return [] if any(s.startswith("train.epochs=") for s in settings) else [f"train.epochs={epochs}"]


def hybrid_candidates(dataset: str) -> dict[str, list[str]]:
    """Schedule, epochs and augmentation tried on validation for the hybrid paper's network; where
    the target was missed with those (Fashion-MNIST), also twice the epochs and grouped neurons."""
    longer = [f"train.epochs={HYBRID_EPOCHS}"] + COSINE
    candidates = {"10 epochs, constant lr": ["train.epochs=10"],
                  f"{HYBRID_EPOCHS} epochs, cosine": longer,
                  f"{HYBRID_EPOCHS} epochs, cosine, augment": longer + augment_settings(dataset)}
    if dataset in HYBRID_MORE:
        recipe, _ = method_recipe("hybrid", dataset)
        grouped = [f"{path}.groups={HYBRID_GROUPS}" for path in objective_paths(recipe)]
        longest = [f"train.epochs={2 * HYBRID_EPOCHS}"] + COSINE
        candidates.update({f"{2 * HYBRID_EPOCHS} epochs, cosine": longest,
                           f"{HYBRID_EPOCHS} epochs, cosine, {HYBRID_GROUPS} groups": longer + grouped,
                           f"{2 * HYBRID_EPOCHS} epochs, cosine, {HYBRID_GROUPS} groups": longest + grouped})
    return candidates


def hybrid_select_jobs(seeds: list[int], out: Path) -> list[Job]:
    """The hybrid paper's 784-512-256-128-10 network: each candidate, seed 0, on a validation split."""
    jobs = []
    for dataset in HYBRID_DATASETS:
        recipe, retarget = method_recipe("hybrid", dataset)
        for name, settings in hybrid_candidates(dataset).items():
            jobs.append(Job(f"{dataset}/hybrid/{name}", recipe,
                            retarget + settings + [f"data.validation={VALIDATION}", "seed=0"],
                            {"dataset": dataset, "method": "hybrid", "candidate": name, "settings": settings,
                             "seed": 0}, eval_noise=[0.0]))
    return jobs


def local_candidates(method: str) -> dict[str, list[str]]:
    """The settings tried on validation for a plugin family's recipe: FF's learning rate and
    prediction rule, SigProp's loss and prediction rule."""
    subnetwork, blocks = LOCAL_METHODS[method]

    def every_block(**options) -> list[str]:
        return [f"model.subnetworks.{subnetwork}.blocks.{block}.objective.{key}={value}"
                for block in blocks for key, value in options.items()]

    # Each candidate sets the prediction rule itself, so the recipe may ship the winner.
    goodness, head, signal = (f"model.streams.predict={rule}" for rule in ("goodness", "head", "signal"))
    if method == "ff":
        # The learning rate, of the ff layers and the head alike, and the prediction rule; the SymBa loss
        # and the head's wiring are the recipe's (the loss chosen over Hinton's logistic loss on validation
        # in an earlier version of this study, kept in git).
        return {f"lr {lr}, by {rule}": [f"optim.local.lr={lr}", f"optim.global.lr={lr}", setting]
                for lr in FF_LEARNING_RATES for rule, setting in (("head", head), ("goodness", goodness))}
    return {"sim, by head": [head],
            "sim, by signal": [signal],
            "l2, by head": every_block(loss="l2") + [head]}


def local_select_jobs(seeds: list[int], out: Path) -> list[Job]:
    """FF and SigProp on MNIST: each candidate, seed 0, on a validation split."""
    return [Job(f"mnist/{method}/{name}", f"mnist_{method}",
                settings + [f"train.epochs={LOCAL_SELECT_EPOCHS}", f"data.validation={VALIDATION}", "seed=0"],
                {"dataset": "mnist", "method": method, "candidate": name, "settings": settings, "seed": 0},
                eval_noise=[0.0])
            for method in LOCAL_METHODS for name, settings in local_candidates(method).items()]


def local_jobs(seeds: list[int], out: Path) -> list[Job]:
    """FF and SigProp with the settings chosen on MNIST, and backprop on the same widths and schedule:
    the 3x1024 backprop MLP of pHSIC's table, narrowed to the plugins' 1000 units."""
    jobs = []
    twin = [f"model.subnetworks.mlp.blocks.{block}.out=1000" for block in ("fc1", "fc2", "fc3")]
    for dataset, count in LOCAL_SEEDS.items():
        for method in LOCAL_METHODS:
            best = chosen(out, "local-select", "mnist", method)
            if best is None:
                continue  # its settings are not chosen yet: the jobs appear once local-select has run
            candidate = best["candidate"] + ("" if dataset == "mnist" else ", chosen on MNIST")
            epochs = [f"train.epochs={LOCAL_EPOCHS[method]}"]
            for seed in seeds[:count]:
                jobs.append(Job(f"{dataset}/{method}/seed{seed}", f"{dataset}_{method}",
                                best["settings"] + epochs + [f"seed={seed}"],
                                {"dataset": dataset, "method": method, "candidate": candidate, "seed": seed},
                                eval_noise=[0.0]))
                jobs.append(Job(f"{dataset}/{method}-backprop/seed{seed}", f"phsic_{dataset}_backprop",
                                twin + COSINE + epochs + [f"seed={seed}", f"name={dataset}_{method}_backprop_twin"],
                                {"dataset": dataset, "method": f"{method}'s backprop twin", "candidate": "—",
                                 "seed": seed}, eval_noise=[0.0]))
    return jobs


# What the command's flags add to a job's overrides (--epochs, --tiny, the device): see job_extra.
FLAG_KEYS = ("train.device=", "train.epochs=", "data.train_limit=", "data.validation=")


def job_extra(job: Job, epochs: int | None = None, tiny: bool = False) -> list[str]:
    """The overrides the command's flags add to ``job``'s own."""
    extra = ["train.device=cpu"] + ([f"train.epochs={epochs}"] if epochs else [])
    if tiny:
        extra += ["train.epochs=1", "data.train_limit=1000"]
        if any(o.startswith("data.validation=") for o in job.overrides):
            extra.append("data.validation=200")
    return extra


def current(record: dict | None, job: Job, extra: list[str]) -> bool:
    """Whether ``record`` was trained as ``job`` with ``extra`` would train now: a job whose
    settings changed since is trained again on the next run of its study."""
    return record is not None and record["overrides"] == job.overrides + extra


def same_settings(record: dict | None, job: Job) -> bool:
    """Whether ``record`` was trained with ``job``'s own overrides, whatever the command's flags added."""
    if record is None or record["overrides"][:len(job.overrides)] != job.overrides:
        return False
    return all(o.startswith(FLAG_KEYS) for o in record["overrides"][len(job.overrides):])


def chosen(out: Path, select: str, dataset: str, method: str) -> dict | None:
    """The record with the best validation accuracy among a select study's candidates for
    (dataset, method); None until every candidate has a record with its current settings."""
    path = out / f"{select}.json"
    records = json.loads(path.read_text())["records"] if path.exists() else {}
    candidates = [job for job in STUDIES[select]([0], out) if job.labels["dataset"] == dataset
                  and job.labels["method"] == method]
    if not candidates or not all(same_settings(records.get(job.key), job) for job in candidates):
        return None
    return max((records[job.key] for job in candidates), key=lambda r: r["val_acc"])


def phsic_jobs(seeds: list[int], out: Path) -> list[Job]:
    """pHSIC's table: the chosen settings per (dataset, method), trained on the full training set.

    Where the HSIC-only winner also chose how to train (augmentation, epochs), the backprop twin
    is trained that way too, in a row of its own, so the comparison stays like for like."""
    jobs = []
    for dataset in PHSIC_DATASETS:
        winners = {method: chosen(out, "phsic-select", dataset, method) for method in ("hsic", "hybrid")}
        winners["backprop"] = {"candidate": "—", "settings": []}
        training = training_settings((winners["hsic"] or {"settings": []})["settings"])
        if training:
            winners[PHSIC_TWIN] = {"candidate": ", ".join(training), "settings": training}
        for method, best in winners.items():
            if best is None:
                continue  # its settings are not chosen yet: the jobs appear once phsic-select has run
            epochs = epochs_unless_set(best["settings"], PHSIC_EPOCHS[dataset])
            recipe = f"phsic_{dataset}_{'backprop' if method == PHSIC_TWIN else method}"
            for seed in seeds[:PHSIC_SEEDS.get((dataset, method), 1)]:
                jobs.append(Job(f"{dataset}/{method}/seed{seed}", recipe,
                                best["settings"] + COSINE + epochs + [f"seed={seed}"],
                                {"dataset": dataset, "method": method, "candidate": best["candidate"],
                                 "seed": seed}, eval_noise=[0.0]))
    return jobs


def hybrid_jobs(seeds: list[int], out: Path) -> list[Job]:
    """The hybrid network with its chosen settings, and its backprop twin with the same settings."""
    jobs = []
    for dataset in HYBRID_DATASETS:
        best = chosen(out, "hybrid-select", dataset, "hybrid")
        if best is None:
            continue  # its settings are not chosen yet: the jobs appear once hybrid-select has run
        for method in ("hybrid", "backprop"):
            recipe, retarget = method_recipe(method, dataset)
            # The twin takes the chosen epochs, schedule and augmentation; the nHSIC options (model.*)
            # have no block to apply to in it.
            settings = best["settings"] if method == "hybrid" else training_settings(best["settings"])
            candidate = best["candidate"] if settings == best["settings"] else "the hybrid's, less its nHSIC options"
            for seed in seeds:
                jobs.append(Job(f"{dataset}/{method}/seed{seed}", recipe,
                                retarget + settings + [f"seed={seed}"],
                                {"dataset": dataset, "method": method, "candidate": candidate,
                                 "seed": seed}, eval_noise=[0.0]))
    return jobs


def noise_space_jobs(seeds: list[int], out: Path) -> list[Job]:
    """Tables II and III in both noise spaces, for the hybrid and backprop, with the paper's 10 epochs.

    Table II trains and tests at the same std, in one space; Table III trains clean and tests at
    std 0.5, so one clean run per seed serves both spaces."""
    jobs = []
    for method in ("hybrid", "backprop"):
        recipe, retarget = method_recipe(method, "mnist")
        for seed in seeds:
            jobs.append(Job(f"clean/{method}/seed{seed}", recipe, retarget + [f"seed={seed}"],
                            {"table": "III", "space": "both", "train_noise": 0.0, "method": method, "seed": seed},
                            eval_noise=[0.5], eval_spaces=("pixel", "normalized")))
            for space in ("pixel", "normalized"):
                for train_noise in (0.05, 0.5, 0.8):
                    jobs.append(Job(f"{space}{train_noise}/{method}/seed{seed}", recipe,
                                    retarget + [f"seed={seed}", f"data.train_noise={train_noise}",
                                                f"data.noise_space={space}"],
                                    {"table": "II", "space": space, "train_noise": train_noise, "method": method,
                                     "seed": seed}, eval_noise=[train_noise], eval_spaces=(space,)))
    return jobs


STUDIES = {"accuracy": accuracy_jobs, "noise": noise_jobs, "sensitivity": sensitivity_jobs, "conv": conv_jobs,
           "phsic-select": phsic_select_jobs, "phsic": phsic_jobs, "hybrid-select": hybrid_select_jobs,
           "hybrid": hybrid_jobs, "noise-spaces": noise_space_jobs, "local-select": local_select_jobs,
           "local": local_jobs}


def run_job(job: Job, extra: list[str], runs_dir: Path) -> dict:
    """Train and evaluate one job; return its record."""
    recipe = load_recipe(shipped_recipes()[job.recipe], job.overrides + extra)
    started = time.perf_counter()
    run = train_recipe(recipe, runs_dir, show_progress=False, quiet=True)
    return record_of(job, run, extra, time.perf_counter() - started)


def record_of(job: Job, run: Path, extra: list[str], wall: float) -> dict:
    """The record of ``job`` trained in ``run``: its log read back, its weights evaluated under test noise."""
    history = read_metrics(run / METRICS_FILE)  # one record per epoch, checked
    reports = {space: evaluate_noise(run / WEIGHTS_FILE, job.eval_noise, show_progress=False, noise_space=space)
               for space in job.eval_spaces}
    return {
        **job.labels,
        "recipe": job.recipe,
        "overrides": job.overrides + extra,
        "epochs": len(history),
        "test_acc": history[-1]["test_acc"],
        "val_acc": history[-1].get("val_acc"),
        "test_acc_by_epoch": [row["test_acc"] for row in history],
        **{("noise" if space == "pixel" else f"noise_{space}"): {f"{row['noise']:g}": row["acc"]
                                                                  for row in report["results"]}
           for space, report in reports.items()},
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


PHSIC_PUBLISHED = {"hsic": {"mnist": 98.4, "fashion_mnist": 88.8, "cifar10": 52.5},
                   "backprop": {"mnist": 98.6, "fashion_mnist": 90.2, "cifar10": 60.0}}
HYBRID_TARGETS = {"mnist": 98.0, "fashion_mnist": 89.0}
PAPER_TABLE_II = {0.05: 95.97, 0.5: 93.22, 0.8: 91.28}
PAPER_TABLE_III = 92.61


def select_markdown(records: dict) -> list[str]:
    lines = ["| dataset | method | candidate | epochs | validation acc % | test acc % (not used) | chosen |",
             "|---|---|---|---|---|---|---|"]
    for (dataset, method), rows in group(records, "dataset", "method").items():
        best = max(rows, key=lambda r: r["val_acc"])
        for r in rows:
            lines.append(f"| {dataset} | {method} | {r['candidate']} | {r['epochs']} | {100 * r['val_acc']:.2f} | "
                         f"{100 * r['test_acc']:.2f} | {'yes' if r is best else ''} |")
    return lines


def settings_table(records: dict, chosen_title: str, target_title: str, target, epochs: bool = True) -> list[str]:
    """One row per (dataset, method): the chosen settings, the epochs (when ``epochs``), the seeds,
    the test accuracy, the figure to compare with (``target(dataset, method)``, None for none) and
    the mean training time."""
    titles = ["dataset", "method", chosen_title, *(["epochs"] if epochs else []), "seeds", "test acc %",
              target_title, "train time / run"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for (dataset, method), rows in group(records, "dataset", "method").items():
        goal = target(dataset, method)
        cells = [dataset, method, rows[0]["candidate"], *([rows[0]["epochs"]] if epochs else []), len(rows),
                 mean_std([r["test_acc"] for r in rows]), "—" if goal is None else goal,
                 f"{statistics.mean(r['train_seconds'] for r in rows):.0f} s"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def phsic_markdown(records: dict) -> list[str]:
    return settings_table(records, "settings (chosen on validation)", "pHSIC README %",
                          lambda dataset, method: PHSIC_PUBLISHED.get(method, {}).get(dataset))


def hybrid_markdown(records: dict) -> list[str]:
    return settings_table(records, "settings (chosen on validation)", "issue's target %",
                          lambda dataset, method: HYBRID_TARGETS[dataset] if method == "hybrid" else None,
                          epochs=False)


def local_markdown(records: dict) -> list[str]:
    return settings_table(records, "settings (chosen on validation)", "issue's target %",
                          lambda dataset, method: LOCAL_TARGETS.get(method) if dataset == "mnist" else None)


def noise_space_markdown(records: dict) -> list[str]:
    table_ii = {k: r for k, r in records.items() if r["table"] == "II"}
    table_iii = {k: r for k, r in records.items() if r["table"] == "III"}
    lines = ["Table II (train and test at the same std):", "",
             "| noise space | std | method | seeds | test acc % | paper's hybrid % |", "|---|---|---|---|---|---|"]
    for (space, noise, method), rows in group(table_ii, "space", "train_noise", "method").items():
        lines.append(f"| {space} | {noise:g} | {method} | {len(rows)} | {mean_std([r['test_acc'] for r in rows])} | "
                     f"{PAPER_TABLE_II[noise] if method == 'hybrid' else '—'} |")
    lines += ["", "Table III (clean training, test noise std 0.5):", "",
              "| method | seeds | clean test acc % | pixel space % | normalized space % | paper's hybrid % |",
              "|---|---|---|---|---|---|"]
    for (method,), rows in group(table_iii, "method").items():
        lines.append(f"| {method} | {len(rows)} | {mean_std([r['test_acc'] for r in rows])} | "
                     f"{mean_std([r['noise']['0.5'] for r in rows])} | "
                     f"{mean_std([r['noise_normalized']['0.5'] for r in rows])} | "
                     f"{PAPER_TABLE_III if method == 'hybrid' else '—'} |")
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
# Studies whose default is seed 0 only, to fit a CPU session (select studies always use seed 0).
ONE_SEED = ("sensitivity", "conv", "noise-spaces", "phsic-select", "hybrid-select", "local-select")

RENDERERS = {"accuracy": accuracy_markdown, "noise": noise_markdown, "sensitivity": sensitivity_markdown,
             "conv": accuracy_markdown, "phsic-select": select_markdown, "hybrid-select": select_markdown,
             "phsic": phsic_markdown, "hybrid": hybrid_markdown, "noise-spaces": noise_space_markdown,
             "local-select": select_markdown, "local": local_markdown}


def write_results(study: str, out: Path, state: dict, shown: list[str]) -> None:
    """The study's JSON (the resume state) and its Markdown table of the records ``shown``: the
    others are stale (their job's settings changed since) or no job of the study makes them."""
    records = {key: state["records"][key] for key in shown}
    total = sum(record["wall_seconds"] for record in records.values())
    write_text_atomic(out / f"{study}.json", json.dumps(state, indent=2) + "\n")
    machine = state["machine"]
    header = [f"# Study: {study}", "",
              f"Command: `{state['command']}`", "",
              f"Machine: {machine['cpu']}, {machine['threads']} torch thread(s), device {machine['device']}, "
              f"torch {machine['torch']}. Wall time of all jobs: {total / 60:.1f} min.", ""]
    body = RENDERERS[study](records) if records else ["(no finished jobs yet)"]
    hidden = [key for key in state["records"] if key not in records]
    if hidden:
        body += ["", f"Not shown, stale or no longer in the study (the JSON keeps them): {', '.join(hidden)}."]
    write_text_atomic(out / f"{study}.md", "\n".join(header + body) + "\n")


def in_study_order(records: dict, order: list[str]) -> dict:
    """Records sorted as the study lists its jobs (dataset, method, seed), however they were run."""
    return dict(sorted(records.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock beside ``path`` while a finished job is merged into the study's JSON."""
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a reproduction study; finished jobs are skipped on rerun, "
                                                 "unless their settings changed since.")
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (sensitivity, conv: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    parser.add_argument("--only", default="", help="run only jobs whose key starts with this, e.g. mnist/hybrid")
    parser.add_argument("--tiny", action="store_true", help="1 epoch on 1,000 samples, to check the code")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings comparable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: docs/results (with --tiny: RUNS_DIR/tiny-results)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "studies")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    defaults = [0] if args.study in ONE_SEED else [0, 1, 2]
    seeds = args.seeds or defaults
    # A smoke test never lands among the measured records (nor counts as one of them).
    args.out = args.out or (args.runs_dir / "tiny-results" if args.tiny else RESULTS)
    jobs = [job for job in STUDIES[args.study](seeds, args.out) if job.key.startswith(args.only)]
    if not jobs:
        raise SystemExit(f"{args.study}: no job matches --only {args.only!r}"
                         + (f", or its settings wait for '{args.study}-select' to finish"
                            if f"{args.study}-select" in STUDIES else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / f"{args.study}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"records": {}}
    state.pop("total_seconds", None)  # older versions kept the sum, which a job trained again counted twice
    command = argv if argv is not None else __import__("sys").argv[1:]
    # The command that runs the whole study: --only splits it over processes, whose jobs all land here.
    whole = [word for i, word in enumerate(command) if word != "--only" and (i == 0 or command[i - 1] != "--only")]
    state["command"] = "python benchmarks/reproduce.py " + " ".join(whole)
    state["machine"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "device": "cpu",
                        "torch": torch.__version__}
    # Every job of the study, for the seeds of this command, of the default and of the records so
    # far (tables follow its order: dataset, method, seed).
    recorded = {r["seed"] for r in state["records"].values() if isinstance(r.get("seed"), int)}
    catalog = {job.key: job for job in STUDIES[args.study](sorted({*defaults, *seeds, *recorded}), args.out)}

    def extra(job: Job) -> list[str]:
        return job_extra(job, args.epochs, args.tiny)

    def merge_and_write(job: Job | None = None, record: dict | None = None) -> None:
        """Under the lock, since other processes may run other jobs of this study (--only): the
        records on disk (the newest), plus ``record``, written back with the table."""
        with locked(state_path):
            if state_path.exists():
                state["records"] = json.loads(state_path.read_text())["records"]
            if job is not None:
                state["records"][job.key] = record
            state["records"] = in_study_order(state["records"], list(catalog))
            shown = [key for key, rec in state["records"].items()
                     if key in catalog and current(rec, catalog[key], extra(catalog[key]))]
            for key in shown:  # labels only describe a job, so a current record takes the code's wording
                state["records"][key].update(catalog[key].labels)
            write_results(args.study, args.out, state, shown)

    todo = [job for job in jobs if not current(state["records"].get(job.key), job, extra(job))]
    stale = [job.key for job in todo if job.key in state["records"]]
    if stale:
        print(f"{args.study}: trained again, their settings changed since recorded: {', '.join(stale)}")
    with progress_bar() as bars:
        task = bars.add_task(f"{args.study}: {len(jobs) - len(todo)} of {len(jobs)} done", total=len(jobs),
                             completed=len(jobs) - len(todo))
        for job in todo:
            bars.update(task, description=f"{args.study}: {job.key}")
            merge_and_write(job, run_job(job, extra(job), args.runs_dir))
            bars.advance(task)
    merge_and_write()
    if args.study in FIGURES and state["records"]:
        for path in FIGURES[args.study](state["records"], args.out / "figures"):
            print(f"Wrote {path}")
    print((args.out / f"{args.study}.md").read_text())


if __name__ == "__main__":
    main()
