"""The Python API's worked network (docs/python.md, issue "A public Python API"), measured on MNIST.

The network is fixed by the issue: a 32-channel 3x3 convolution trained by nHSIC (sigma 10,
beta 100), then a LazyLinear head trained by backprop, Adam at 1e-3 for both, one epoch.
What the snippet leaves open is the loader's batch size, so it is chosen on a validation split
(the last 10,000 training images, as a recipe's ``data.validation=10000``), and the chosen size
is then trained on all 60,000 images with three seeds and scored on the test set.

    python benchmarks/python_snippet.py          # resumable: finished runs are kept in the JSON
    python benchmarks/python_snippet.py --check  # only rewrite the table from the JSON
    python benchmarks/python_snippet.py --tiny --out DIR  # seconds: 2048 images, for the tests

Writes docs/results/python-snippet.json and docs/results/python-snippet.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import layerwise as lw
from layerwise.data import BatchStream, load_split
from layerwise.plugins import registries
from layerwise.runs import cpu_name
from layerwise.trainer import evaluate

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
BATCH_SIZES = (128, 256, 512)
SEEDS = (0, 1, 2)
VALIDATION = 10_000
COMMAND = "python benchmarks/python_snippet.py"


def snippet_network() -> lw.Network:
    """The network of docs/python.md, exactly as written there."""
    return lw.Network([
        lw.Block("conv1", nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()),
                 objective=lw.objective("nhsic", sigma=10, beta=100)),
        lw.Block("head", nn.Sequential(nn.Flatten(), nn.LazyLinear(10))),
    ])


def one_run(batch_size: int, seed: int, validation: bool, limit: int | None = None) -> dict:
    """Train one epoch; score on the held-out split (validation) or the test set. ``limit`` keeps
    the first training images only, and a tenth as many to score on (the tiny mode)."""
    spec = registries().datasets.get("mnist")
    images, labels = load_split(spec, "train")
    held_out = VALIDATION if limit is None else limit // 10
    if validation:
        score_images, score_labels = images[-held_out:], labels[-held_out:]
        images, labels = images[:-held_out], labels[:-held_out]
    else:
        score_images, score_labels = load_split(spec, "test")
    if limit is not None:
        images, labels, score_images, score_labels = images[:limit], labels[:limit], score_images[:held_out], \
            score_labels[:held_out]
    train = BatchStream(spec, images, labels, batch_size=batch_size, shuffle=True, seed=seed)
    train.set_epoch(1)
    torch.manual_seed(seed)
    net = snippet_network()
    trainer = lw.Trainer(net, local_optim={"name": "adam", "lr": 1e-3}, global_optim={"name": "adam", "lr": 1e-3})
    started = time.perf_counter()
    trainer.train_epoch(train)
    seconds = time.perf_counter() - started
    scored = BatchStream(spec, score_images, score_labels, batch_size=1000, shuffle=False, seed=0)
    return {"batch_size": batch_size, "seed": seed, "split": "validation" if validation else "test",
            "acc": evaluate(net, scored)["acc"], "train_seconds": round(seconds, 1)}


def table(state: dict) -> str:
    """The markdown report: the validation sweep, then the chosen size on the test set."""
    machine = state["machine"]
    lines = [f"The docs/python.md network (conv 32 + nHSIC, LazyLinear head), one epoch on MNIST "
             f"(`{state['command']}`, {machine['cpu']}, {machine['threads']} torch thread):", "",
             f"| batch size | validation acc % (seed 0, last {state['held_out']:,} training images held out) |",
             "|---|---|"]
    for record in state["records"].values():
        if record["split"] == "validation":
            lines.append(f"| {record['batch_size']} | {100 * record['acc']:.2f} |")
    tests = [r for r in state["records"].values() if r["split"] == "test"]
    if tests:
        accs = [100 * r["acc"] for r in tests]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        lines += ["", f"Chosen batch size {tests[0]['batch_size']}, trained on all 60,000 images: test accuracy "
                      f"**{statistics.mean(accs):.2f}{spread}%** over seeds {', '.join(str(r['seed']) for r in tests)} "
                      f"(each: {', '.join(f'{a:.2f}' for a in accs)}), "
                      f"{statistics.mean(r['train_seconds'] for r in tests):.0f} s of training per run."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only rewrite the table from the JSON")
    parser.add_argument("--tiny", action="store_true", help="2048 training images, batch sizes 64 and 128, one seed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for python-snippet.json and .md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings comparable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    limit, batch_sizes, seeds = (2048, (64, 128), (0,)) if args.tiny else (None, BATCH_SIZES, SEEDS)
    path = args.out / "python-snippet.json"
    state = json.loads(path.read_text()) if path.exists() else {"records": {}}
    state["machine"] = state.get("machine") or {"cpu": cpu_name(), "threads": torch.get_num_threads()}
    state["command"] = COMMAND + (" --tiny" if args.tiny else "")
    state["held_out"] = VALIDATION if limit is None else limit // 10
    if not args.check:
        for batch_size in batch_sizes:
            key = f"validation-{batch_size}"
            if key not in state["records"]:
                state["records"][key] = one_run(batch_size, 0, validation=True, limit=limit)
                path.write_text(json.dumps(state, indent=1))
                print(state["records"][key], flush=True)
        validation = [r for r in state["records"].values() if r["split"] == "validation"]
        chosen = max(validation, key=lambda r: r["acc"])["batch_size"]
        for seed in seeds:
            key = f"test-{chosen}-{seed}"
            if key not in state["records"]:
                state["records"][key] = one_run(chosen, seed, validation=False, limit=limit)
                path.write_text(json.dumps(state, indent=1))
                print(state["records"][key], flush=True)
    path.write_text(json.dumps(state, indent=1))
    (args.out / "python-snippet.md").write_text(table(state))
    print(table(state))
    return state


if __name__ == "__main__":
    main()
