"""Run folders: ``runs/<recipe>-<YYYYmmdd-HHMMSS>/`` with the recipe, environment and metrics.

``runs/latest`` is a symlink to the newest run, so commands that take a run need no path.
A process training a run holds an exclusive lock on its ``.lock`` file (see :func:`lock_run`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from layerwise.atomic import file_mode, write_text_atomic
from layerwise.errors import LayerwiseError
from layerwise.recipe import Recipe, dump_recipe
from layerwise.version import __version__

LATEST = "latest"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive ``flock`` on a run folder's ``.lock``, held while one process trains the run.

    The kernel releases it when the process ends, however it ends (a SIGKILL included), so a
    lock is never left stale. The file holds the holder's pid, for the refusal message only.
    """

    def __init__(self, run: Path, fd: int):
        self.run, self.fd = run, fd

    def record_pid(self) -> None:
        """Write this process's pid into the lock file (done once the holder is sure to train)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock up (closing the file is what releases a flock)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_run(run: Path, create: bool = True) -> RunLock | None:
    """Lock ``run`` for training, or say in one line which process holds it; the folder is unchanged.

    Two processes training one folder overwrite each other's files, and a resume deletes the
    temporary files of the writes a running trainer has in flight. ``create=False`` returns None
    instead of creating a missing lock file (in a folder nobody trains: no lock file, no trainer).
    """
    try:
        fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), file_mode())
    except FileNotFoundError:
        if create:
            raise LayerwiseError(f"{run}: this run folder no longer exists") from None
        return None
    except OSError as exc:
        raise LayerwiseError(f"{run}: cannot write in this run folder ({exc.strerror}); "
                             f"its files are untouched") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LayerwiseError(f"{run}: cannot lock this run folder ({exc.strerror}); "
                                 f"its files are untouched") from None
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise LayerwiseError(f"{run}: another layerwise process{pid} is training this run folder; wait for it to "
                             f"end or stop it, then resume. Its files are untouched") from None
    return RunLock(run, fd)


def check_unlocked(run: Path) -> None:
    """Refuse at once, changing nothing, when another process trains ``run``; the caller locks it
    for real (:func:`lock_run`) once its checks have passed, just before it writes."""
    lock = lock_run(run, create=False)
    if lock is not None:
        lock.release()


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """Identity, size and time of a file (None when missing): a replaced file gets a new signature."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def folder_mode() -> int:
    """The mode ``mkdir`` would give: mkdtemp makes 0700 folders, which would hide a run from its group."""
    mode = file_mode()
    return mode | (mode & 0o444) >> 2  # search permission wherever there is read permission


def create_run_dir(runs_root: str | Path, recipe: Recipe, device: torch.device) -> tuple[Path, RunLock]:
    """Make a fresh run folder holding its files and ``eval/``, point ``latest`` at it, and return it locked.

    The folder is filled under a hidden temporary name, renamed into place (suffixing ``-1``,
    ``-2`` if the second is taken) and only then made ``latest``: a kill at any moment leaves
    ``latest`` on a complete run, never on an empty folder that ``--resume`` would refuse. A kill
    before the rename leaves a hidden ``.<name>-<time>.*.tmp`` folder, which nothing reads.
    """
    root = Path(runs_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    staging = lock = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{recipe.name}-{stamp}.", suffix=".tmp"))
        os.chmod(staging, folder_mode())
        (staging / "eval").mkdir()
        lock = lock_run(staging)  # the open file follows the rename, and the lock with it
        lock.record_pid()
        write_run_files(staging, recipe, device)
        for attempt in range(1000):
            run = root / (f"{recipe.name}-{stamp}" + (f"-{attempt}" if attempt else ""))
            if os.path.lexists(run):  # rename would silently replace an empty folder
                continue
            try:
                os.rename(staging, run)
                break
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        else:
            raise LayerwiseError(f"cannot create a run folder under {root}: 1000 folders named {recipe.name}-{stamp}")
        staging, lock.run = None, run
        point_latest(root, run)
    except BaseException as exc:
        if lock is not None:
            lock.release()
        if staging is not None:  # not published: nothing of it may remain
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise LayerwiseError(f"cannot create a run folder under {root}: {exc.strerror}") from None
        raise
    return run, lock


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
