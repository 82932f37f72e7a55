"""Peak training memory as depth grows, for backprop, hybrid and HSIC-only stacks of 256-wide blocks.

Each measurement runs in a fresh subprocess, so one configuration's allocations cannot hide in
another's. On the CPU the figure is the growth of peak RSS (``ru_maxrss``) from just before the
first training step to the end of a few steps: the training working set, with the interpreter
and torch itself excluded. On CUDA it is ``torch.cuda.max_memory_allocated``.
Writes ``docs/results/memory.json`` and ``docs/results/memory.md``.

    python benchmarks/memory.py                       # depths 4 8 16 32, batch 1024, CPU
    python benchmarks/memory.py --depths 2 4 --batch 64   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from layerwise.atomic import write_text_atomic
from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.runs import cpu_name
from layerwise.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
METHODS = ("backprop", "hybrid", "hsic", "hsic+free_early")
"""``hsic`` keeps the whole graph to the end of the step (``train.free_early: false``); the others free early."""
NHSIC = {"name": "nhsic", "sigma": 5, "beta": 100}


def stack_recipe(method: str, depth: int, width: int) -> dict:
    """``depth`` linear+relu blocks of ``width`` and a linear head, trained as ``method`` says."""
    blocks = []
    for i in range(depth):
        local = method.startswith("hsic") or (method == "hybrid" and i % 2 == 0)
        blocks.append({"name": f"b{i}", "layer": "linear", "out": width, "act": "relu",
                       "objective": NHSIC if local else "none"})
    blocks.append({"name": "head", "layer": "linear", "out": 10, "detach": method.startswith("hsic")})
    train = {"epochs": 1, "device": "cpu", "free_early": method != "hsic"}
    return {"name": f"{method}-{depth}", "data": {"dataset": "mnist"}, "train": train,
            "model": {"subnetworks": [{"name": "stack", "blocks": blocks}]}}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(method: str, depth: int, width: int, batch: int, steps: int, device: str) -> dict:
    """Build the stack, take ``steps`` training steps, and report the memory they needed."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    recipe = parse_recipe(stack_recipe(method, depth, width), method)
    torch.manual_seed(0)
    graph = network_from_recipe(recipe, (1, 28, 28), 10).to(dev)
    trainer = Trainer.from_recipe(graph, recipe)
    x = torch.randn(batch, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = peak_rss_bytes()
    graph.train()
    for _ in range(steps):
        trainer.step(x, y)
    after = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes()
    # Weights, gradients and Adam's two moments: memory every method needs, whatever it frees.
    state = 4 * sum(p.numel() * p.element_size() for p in graph.parameters())
    return {"method": method, "depth": depth, "peak_mib": round((after - before) / 2**20, 1),
            "param_state_mib": round(state / 2**20, 1)}


def measure(method: str, depth: int, args) -> dict:
    """Run one configuration in a fresh interpreter."""
    command = [sys.executable, __file__, "--worker", method, str(depth), "--width", str(args.width),
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
    # Large blocks go straight to mmap and back to the OS when freed, so that peak RSS tracks
    # the memory really in use rather than glibc's heap high-water mark.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Peak training memory against depth, per method.")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "DEPTH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.width, args.batch, args.steps, args.device)))
        return {}

    rows = [measure(method, depth, args) for method in args.methods for depth in args.depths]
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "machine": {"cpu": cpu_name(), "device": args.device,
                                                      "torch": torch.__version__},
              "width": args.width, "batch": args.batch, "steps": args.steps, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "memory.json", json.dumps(result, indent=2) + "\n")
    table = {(r["method"], r["depth"]): f"{r['peak_mib']:.1f} ({r['param_state_mib']:.1f})" for r in rows}
    what = "peak RSS growth" if args.device == "cpu" else "peak allocated"
    lines = [f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, device {args.device}, torch {torch.__version__}; "
             f"blocks of {args.width}, batch {args.batch}, {args.steps} training steps; {what} in MiB, "
             f"and in brackets the part that is weights, gradients and Adam state.", "",
             "| method | " + " | ".join(f"depth {d}" for d in args.depths) + " |",
             "|---|" + "---|" * len(args.depths)]
    for method in args.methods:
        lines.append(f"| {method} | " + " | ".join(table[(method, d)] for d in args.depths) + " |")
    write_text_atomic(args.out / "memory.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
