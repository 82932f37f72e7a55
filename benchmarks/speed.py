"""Time one training step of the MNIST recipes, alternating between them in one process.

Alternating keeps the ratios honest on a shared, noisy machine: every method sees the same
background load. Reports the median ms per batch (after warm-up), samples per second, and each
method's time relative to ``mnist_backprop`` and to backprop on the same widths: a recipe whose
layers differ from every all-backprop recipe measured is also timed as its "backprop twin"
(every objective ``none``, nothing detached). Writes ``docs/results/speed.json`` and
``docs/results/speed.md``.

    python benchmarks/speed.py                 # 1 thread, batch 256, 30 rounds of 5 steps
    python benchmarks/speed.py --tiny          # a few steps, to check the code
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch
import yaml

from layerwise.atomic import write_text_atomic
from layerwise.factory import load_recipe, network_from_recipe, parse_recipe
from layerwise.recipe import Recipe
from layerwise.runs import cpu_name
from layerwise.shipped import shipped_recipes
from layerwise.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
BASELINE = "mnist_backprop"


def load(name: str, overrides: list[str], nhsic: dict | None = None) -> Recipe:
    """A shipped MNIST recipe; ``nhsic`` options are applied to every nhsic block
    (e.g. ``{"normalization": "cka"}``)."""
    recipe = load_recipe(shipped_recipes()[name], overrides)
    for block in recipe.model.blocks():
        if block.objective_name == "nhsic":
            block.objective = {**block.objective, **(nhsic or {})}
    return recipe


def is_backprop(recipe: Recipe) -> bool:
    """True when every block is trained by the global loss."""
    return all(block.objective_name == "none" and not block.detach for block in recipe.model.blocks())


def backprop_twin(recipe: Recipe) -> Recipe:
    """The same layers with every objective ``none`` and nothing detached: plain backprop.
    Rebuilt through validation, so that each block's objective config is built as for any recipe."""
    data = recipe.to_dict()
    data["name"] = f"{recipe.name}-as-backprop"
    for sub in data["model"]["subnetworks"]:
        for block in sub["blocks"]:
            block.update(objective="none", detach=False)
    return parse_recipe(data, data["name"])


def widths(recipe: Recipe) -> tuple:
    """What fixes a network's cost whatever trains it: each block without its name and objective."""
    ignored = ("name", "objective", "objective_config", "detach", "freeze")
    return tuple(tuple(repr(v) for k, v in dataclasses.asdict(b).items() if k not in ignored)
                 for b in recipe.model.blocks())


def with_twins(recipes: dict[str, Recipe]) -> tuple[dict[str, Recipe], dict[str, str]]:
    """``recipes`` plus a backprop twin for each recipe with no all-backprop recipe of its widths,
    and for every recipe the name of its same-widths backprop reference."""
    references = {widths(r): name for name, r in recipes.items() if is_backprop(r)}
    timed, reference = dict(recipes), {}
    for name, recipe in recipes.items():
        key = widths(recipe)
        if key not in references:
            references[key] = f"{name} as backprop"
            timed[references[key]] = backprop_twin(recipe)
        reference[name] = references[key]
    return timed, reference


def make_trainer(recipe: Recipe, device: torch.device, compile_blocks: bool = False) -> Trainer:
    """A trainer for an MNIST recipe (28x28 grey input, 10 classes); ``compile_blocks`` wraps
    every block's layers in ``torch.compile`` (the objectives stay eager)."""
    torch.manual_seed(0)
    graph = network_from_recipe(recipe, (1, 28, 28), 10).to(device)
    graph.train()
    if compile_blocks:
        # A hybrid's local backward keeps the graph for the global one (retain_graph=True), which
        # compiled backwards refuse while they donate their buffers.
        torch._functorch.config.donated_buffer = False
        for block in graph.blocks.values():
            block.body = torch.compile(block.body)
    return Trainer.from_recipe(graph, recipe)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timing is true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Milliseconds per step over ``steps`` consecutive steps."""
    sync(x.device)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step(x, y)
    sync(x.device)
    return 1000 * (time.perf_counter() - started) / steps


def measure(recipes: dict[str, Recipe], batch: int, rounds: int, steps: int, warmup: int,
            device: torch.device, compile_blocks: bool = False) -> dict[str, list[float]]:
    """Per-method lists of ms/step, measured round-robin; with ``compile_blocks``, each recipe
    also as ``NAME compiled``."""
    trainers = {name: make_trainer(recipe, device) for name, recipe in recipes.items()}
    if compile_blocks:
        trainers.update({f"{name} compiled": make_trainer(recipe, device, True) for name, recipe in recipes.items()})
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    for trainer in trainers.values():
        time_steps(trainer, x, y, warmup)
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            samples[name].append(time_steps(trainer, x, y, steps))
    return samples


def median_ms(fn, device: torch.device, repeats: int = 25, budget_s: float = 2.0) -> float:
    """Median milliseconds of one call of ``fn`` after a warm-up: ``repeats`` calls, or as many
    as fit in ``budget_s`` seconds (at least 3) when one call is slow (large batches)."""
    times: list[float] = []
    for i in range(repeats + 1):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        if i:  # the first call warms up
            times.append(1000 * (time.perf_counter() - started))
        if len(times) >= 3 and sum(times) > 1000 * budget_s:
            break
    return statistics.median(times)


def nhsic_floor_ms(trainer: Trainer, batch: int, device: torch.device) -> float:
    """The time one step's exact nHSIC spends in dense algebra that no implementation can skip.

    Timed one call at a time: per ``cca`` block the Gram product and its gradient's product, one
    Cholesky factorisation, one inverse from it and the two ``m x m x m`` products of the backward;
    per ``cka`` block the two Gram products; and once per batch the input's Gram product (and,
    for ``cca``, its factorisation and inverse). The label term's ``C x C`` solve is left out.
    Elementwise passes, the network itself and the optimizer come on top.
    """
    m = batch

    def matmul(rows: int, inner: int, cols: int) -> float:
        a, b = torch.randn(rows, inner, device=device), torch.randn(inner, cols, device=device)
        return median_ms(lambda: a @ b, device)

    features = torch.randn(m, 2 * m, device=device)
    spd = features @ features.T / (2 * m) + 1e-3 * torch.eye(m, device=device)
    factor = torch.linalg.cholesky(spd)
    factorise = median_ms(lambda: torch.linalg.cholesky_ex(spd), device) + median_ms(
        lambda: torch.cholesky_inverse(factor), device)
    total, per_batch = 0.0, set()
    for block in trainer.graph.local_blocks():
        objective = block.objective
        if objective.name != "nhsic" or objective.config.estimator != "exact":
            continue
        width, cca = math.prod(objective.info.out_shape), objective.config.normalization == "cca"
        total += matmul(m, width, m) + matmul(m, m, width) + (factorise + 2 * matmul(m, m, m) if cca else 0.0)
        if objective.config.normalization not in per_batch:
            per_batch.add(objective.config.normalization)
            total += matmul(m, math.prod(objective.info.input_shape), m) + (factorise if cca else 0.0)
    return total


def summarise(samples: dict[str, list[float]], batch: int, reference: dict[str, str]) -> dict[str, dict]:
    """Median ms/batch, samples/s, and the ratios to the baseline and to the same-widths backprop."""
    medians = {name: statistics.median(values) for name, values in samples.items()}
    base = medians.get(BASELINE)
    return {
        name: {
            "ms_per_batch": round(ms, 3),
            "samples_per_s": round(1000 * batch / ms, 1),
            "vs_backprop": round(ms / base, 3) if base else None,
            "same_widths_backprop": reference.get(name, name),
            "vs_same_widths_backprop": round(ms / medians[reference.get(name, name)], 3),
            "spread_ms": [round(min(samples[name]), 3), round(max(samples[name]), 3)],
        }
        for name, ms in medians.items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Time training steps of the MNIST recipes, alternating.")
    parser.add_argument("--recipes", nargs="+", default=["mnist_backprop", "mnist_hybrid", "mnist_hsic"])
    parser.add_argument("--override", nargs="*", default=[], help="recipe overrides applied to every recipe")
    parser.add_argument("--nhsic", nargs="*", default=[], metavar="KEY=VALUE",
                        help="options for every nhsic block, e.g. normalization=cka or estimator=rff")
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler's top operations for one hybrid step")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed sample")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true",
                        help="also time every recipe with its blocks' layers under torch.compile")
    parser.add_argument("--tiny", action="store_true", help="2 rounds of 1 step at batch 32")
    parser.add_argument("--name", default="speed", help="output name under --out")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.rounds, args.steps, args.warmup = 32, 2, 1, 1

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    nhsic = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.nhsic)}
    recipes, reference = with_twins({name: load(name, args.override, nhsic) for name in args.recipes})
    samples = measure(recipes, args.batch, args.rounds, args.steps, args.warmup, device, args.compile)
    if args.compile:  # a compiled recipe is compared with the same-widths backprop, compiled too
        reference.update({f"{name} compiled": f"{ref} compiled" for name, ref in reference.items()})
    results = summarise(samples, args.batch, reference)
    for name in samples:
        floor = nhsic_floor_ms(make_trainer(recipes[name.removesuffix(" compiled")], device), args.batch, device)
        results[name]["nhsic_floor_ms"] = round(floor, 3)
        results[name]["nhsic_floor_vs_same_widths_backprop"] = round(
            floor / results[results[name]["same_widths_backprop"]]["ms_per_batch"], 3)
    result = {
        "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": {"cpu": cpu_name(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__},
        "batch": args.batch,
        "overrides": args.override,
        "nhsic": nhsic,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
    lines = [f"Command: `{result['command'].strip()}`", "",
             f"Machine: {result['machine']['cpu']}, device {result['machine']['device']}, "
             f"{result['machine']['threads']} thread(s), torch {result['machine']['torch']}; batch {args.batch}; "
             f"median of {args.rounds} samples of {args.steps} steps, methods alternating"
             + (f"; every nhsic block with {nhsic}" if nhsic else "") + ".", "",
             f"| recipe | ms / batch | samples / s | × {BASELINE} | × backprop on the same widths "
             f"| nHSIC dense-algebra floor, ms (× same-widths backprop) |",
             "|---|---|---|---|---|---|"]
    for name, row in result["results"].items():
        ratio = f"{row['vs_backprop']:.2f}" if row["vs_backprop"] else "-"
        same = f"{row['vs_same_widths_backprop']:.2f} ({row['same_widths_backprop']})"
        floor = f"{row['nhsic_floor_ms']:.2f} ({row['nhsic_floor_vs_same_widths_backprop']:.2f})" \
            if row["nhsic_floor_ms"] else "-"
        lines.append(f"| {name} | {row['ms_per_batch']:.2f} | {row['samples_per_s']:.0f} | {ratio} | {same} "
                     f"| {floor} |")
    write_text_atomic(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.profile:
        hybrid = recipes.get("mnist_hybrid") or load("mnist_hybrid", args.override, nhsic)
        table = profile_step(make_trainer(hybrid, device), args.batch, device)
        write_text_atomic(args.out / f"{args.name}-profile.txt", f"{result['command'].strip()}\n\n{table}\n")
    return result


def profile_step(trainer: Trainer, batch: int, device: torch.device, steps: int = 10) -> str:
    """torch.profiler's table of the operations that take the most time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    time_steps(trainer, x, y, 3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        time_steps(trainer, x, y, steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


if __name__ == "__main__":
    main()
