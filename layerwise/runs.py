"""Run folders: ``runs/<recipe>-<YYYYmmdd-HHMMSS>/`` with the recipe, environment and metrics.

``runs/latest`` is a symlink to the newest run, so commands that take a run need no path.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from layerwise import __version__
from layerwise.atomic import write_text_atomic
from layerwise.errors import LayerwiseError
from layerwise.recipe import Recipe, dump_recipe

LATEST = "latest"
METRICS_FILE = "metrics.jsonl"


def create_run_dir(runs_root: str | Path, recipe: Recipe) -> Path:
    """Make a fresh run folder (suffixing ``-1``, ``-2`` if the second is taken) and point ``latest`` at it."""
    root = Path(runs_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            run = root / (f"{recipe.name}-{stamp}" + (f"-{attempt}" if attempt else ""))
            try:
                run.mkdir()
                break
            except FileExistsError:
                continue
        (run / "eval").mkdir()
        point_latest(root, run)
    except OSError as exc:
        raise LayerwiseError(f"cannot create a run folder under {root}: {exc.strerror}") from None
    return run


def check_writable(folder: Path) -> None:
    """Fail early, in one line, when nothing can be written in ``folder`` (read-only, full, gone)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LayerwiseError(f"{folder}: cannot write in this run folder ({exc.strerror}); "
                             f"its files are untouched") from None


def point_latest(root: Path, run: Path) -> None:
    """Atomically repoint ``root/latest`` at ``run`` (a relative symlink, so the folder can move)."""
    tmp = root / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    os.replace(tmp, root / LATEST)


def git_commit() -> str | None:
    """The commit of the layerwise checkout, when it runs from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), for run records and benchmarks."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_run_files(run: Path, recipe: Recipe, device: torch.device) -> None:
    """``recipe.yaml`` (resolved) and ``env.json`` (versions, device, seed, commit, argv)."""
    write_text_atomic(run / "recipe.yaml", dump_recipe(recipe))
    env = {
        "layerwise": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "seed": recipe.seed,
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
    write_text_atomic(run / "env.json", json.dumps(env, indent=2) + "\n")


class MetricsLog:
    """``metrics.jsonl``: one JSON line per epoch, rewritten atomically so it is never half a line."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []

    def append(self, record: dict) -> None:
        """Add one epoch's record."""
        self.lines.append(json.dumps(record))
        self.write()

    def replace(self, records: list[dict]) -> None:
        """Make ``records`` the whole log (a resumed run keeps the epochs it already has)."""
        self.lines = [json.dumps(record) for record in records]
        self.write()

    def write(self) -> None:
        """Rewrite the file from the lines in memory, atomically."""
        write_text_atomic(self.path, "".join(line + "\n" for line in self.lines))


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (none if it does not exist yet)."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise LayerwiseError(f"{path}: line {number} is not an epoch record; fix or delete that line")
        records.append(record)
    return records


def resolve_run(path: str | Path | None, runs_root: str | Path = "runs") -> Path:
    """A run folder or checkpoint path given by the user, or ``runs/latest``."""
    if path is not None:
        return Path(path)
    latest = Path(runs_root) / LATEST
    if not latest.exists():
        raise LayerwiseError(f"no run given and {latest} does not exist; train first or pass a run folder")
    return latest.resolve()
