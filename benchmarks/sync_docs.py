"""Copy measured tables from ``docs/results/*.md`` into the docs that quote them.

A quoting document marks the spot with a pair of comments; everything between them is replaced:

    <!-- BEGIN results/accuracy.md -->
    ...generated, do not edit...
    <!-- END results/accuracy.md -->

    python benchmarks/sync_docs.py          # rewrite README.md and docs/*.md in place
    python benchmarks/sync_docs.py --check  # exit 1 if any quote is stale (the tests run this)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- BEGIN (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- END (?P=name) -->)", re.S)


def synced(text: str) -> str:
    """``text`` with every marked block replaced by the current content of its source file."""

    def replace(match: re.Match) -> str:
        source = REPO / "docs" / match["name"]
        body = source.read_text() if source.exists() else f"(not measured yet: {match['name']} is missing)\n"
        if source.exists() and source.suffix != ".md":  # plain text (a profiler table) keeps its layout
            body = f"```text\n{body}```\n"
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text)


def summary() -> str | None:
    """The README's short table, derived from the accuracy study (None before it has run)."""
    path = REPO / "docs" / "results" / "accuracy.json"
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    records = state["records"]
    methods = ("hybrid", "hsic", "backprop")
    lines = ["Test accuracy %, mean ± std over seeds; the paper's hybrid against its baselines on the same widths "
             f"(`{state['command']}`, {state['machine']['cpu']}, {state['machine']['threads']} thread):", "",
             "| dataset | hybrid | HSIC-only | backprop | epochs | seeds |", "|---|---|---|---|---|---|"]
    for dataset in dict.fromkeys(r["dataset"] for r in records.values()):
        cells, epochs, seeds = [], set(), set()
        for method in methods:
            accs = [100 * r["test_acc"] for r in records.values() if r["dataset"] == dataset and r["method"] == method]
            epochs |= {r["epochs"] for r in records.values() if r["dataset"] == dataset}
            seeds.add(len(accs))
            if not accs:
                cells.append("-")
            else:
                spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
                cells.append(f"{statistics.mean(accs):.2f}{spread}")
        lines.append(f"| {dataset} | " + " | ".join(cells) + f" | {'/'.join(map(str, sorted(epochs)))} | "
                     f"{'/'.join(map(str, sorted(seeds)))} |")
    first = records.get("mnist/hybrid/seed0")
    if first:
        lines += ["", "`make train` trains the same recipe as the first of these jobs (`recipes/mnist_hybrid.yaml`, "
                      f"seed 0, {first['epochs']} epochs): it reached **{100 * first['test_acc']:.2f}%** test "
                      f"accuracy, with {first['train_seconds']:.0f} s of training ({first['wall_seconds']:.0f} s in "
                      "all, evaluation included) on one thread of the machine above. With another thread count the "
                      "sums round differently, and the papers' nHSIC ridge makes training sensitive to rounding "
                      "(docs/distributed.md): expect a figure near this one, not the same digits."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale quotes instead of rewriting")
    args = parser.parse_args(argv)
    table = summary()
    summary_path = REPO / "docs" / "results" / "summary.md"
    if table is not None and not args.check and (not summary_path.exists() or summary_path.read_text() != table):
        summary_path.write_text(table)
    stale = []
    for doc in DOCS:
        if not doc.exists():
            continue
        text = doc.read_text()
        new = synced(text)
        if new != text:
            stale.append(doc.relative_to(REPO))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print("stale measured tables in: " + ", ".join(map(str, stale)) + "; run python benchmarks/sync_docs.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
