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
import re
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
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale quotes instead of rewriting")
    args = parser.parse_args(argv)
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
