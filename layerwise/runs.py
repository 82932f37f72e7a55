"""Run folders: ``runs/<recipe>-<YYYYmmdd-HHMMSS>/`` with the recipe, environment and metrics.

``runs/latest`` is a symlink to the newest run, so commands that take a run need no path.
A process training a run holds an exclusive lock on its ``.lock`` file (see :func:`lock_run`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from layerwise.atomic import file_mode, write_text_atomic
from layerwise.errors import LayerwiseError, printable
from layerwise.recipe import Recipe, dump_recipe
from layerwise.schema import describe
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
    before the rename leaves a hidden ``.<name>-<time>.*.tmp`` folder, which nothing reads and
    :func:`remove_abandoned_run_folders` deletes (its lock, taken at once, says whether its creator lives).
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


STAGING_NAME = re.compile(r"\..+-[0-9]{8}-[0-9]{6}\..+\.tmp")
"""The hidden name :func:`create_run_dir` fills a run folder under: ``.<recipe>-<time>.<random>.tmp``."""
STAGING_GRACE_SECONDS = 60.0
"""A staging folder whose creator has not yet locked it (it does so at once) is left alone this long."""


def remove_abandoned_run_folders(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Delete the hidden folders that processes killed while creating a run folder left in ``root``;
    return them, and those that could not be deleted (another user's, say).

    Such a folder holds a recipe.yaml and env.json, never an epoch (training starts after the
    rename), and its creator holds the flock on its ``.lock`` from the start: a lock that can be
    taken means the creator is gone, however it ended, whatever its pid became since. A folder
    whose creator has not locked it yet (no lock file, or no pid in it) is left alone for
    :data:`STAGING_GRACE_SECONDS`. The lock is held while the folder is deleted.
    """
    root = Path(root)
    removed: list[Path] = []
    failed: list[Path] = []
    try:
        candidates = sorted(p for p in root.iterdir() if STAGING_NAME.fullmatch(p.name))
    except OSError:  # no runs folder yet, or one we cannot list: nothing to clean
        return removed, failed
    for folder in candidates:
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            young = time.time() - folder.stat().st_mtime < STAGING_GRACE_SECONDS
        except OSError:  # renamed into place (or removed) meanwhile
            continue
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:  # killed before it locked the folder, or locking it this instant
            if young:
                continue
            fd = -1
        except OSError:  # not ours to judge (permissions): leave it
            continue
        try:
            if fd >= 0:
                if young and not os.pread(fd, 32, 0).strip():  # being locked this instant: its pid comes next
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # held: its creator is alive (or the lock cannot be told)
                    continue
            shutil.rmtree(folder, ignore_errors=True)
            (failed if os.path.lexists(folder) else removed).append(folder)
        finally:
            if fd >= 0:
                os.close(fd)
    return removed, failed


def check_writable(folder: Path) -> None:
    """Fail early, in one line, when nothing can be written in ``folder`` (read-only, full, gone)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LayerwiseError(f"{folder}: cannot write in this run folder ({exc.strerror}); "
                             f"its files are untouched") from None


LATEST_TEMPORARY = re.compile(rf"\.{re.escape(LATEST)}\.([0-9]{{1,10}})(\.[0-9a-f]+)?")
"""The link :func:`point_latest` makes and renames onto ``latest``: ``.latest.<pid>.<random>``
(``.latest.<pid>`` before the random part was added: a kill could leave those too)."""
LATEST_GRACE_SECONDS = 60.0
"""A temporary ``latest`` link is left alone this long, whatever its pid says: its creator may run
where this process cannot see its pid (another machine sharing the runs folder, another container)."""


def point_latest(root: Path, run: Path) -> None:
    """Atomically repoint ``root/latest`` at ``run`` (a relative symlink, so the folder can move).

    The link is made under a temporary name, then renamed onto ``latest``; a process killed in
    between leaves that name, which a later call removes once its pid runs no process and it is
    a minute old (:func:`remove_abandoned_latest_links`).
    """
    remove_abandoned_latest_links(root)
    # The random part makes every link's name new: a process given a dead one's pid never makes
    # the name of that one's leftover, so removing a leftover can never remove a link in flight.
    tmp = root / f".{LATEST}.{os.getpid()}.{secrets.token_hex(8)}"
    tmp.symlink_to(run.name)
    try:
        os.replace(tmp, root / LATEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_abandoned_latest_links(root: Path) -> list[Path]:
    """Delete the temporary ``latest`` links that processes killed in :func:`point_latest` left in
    ``root``, and return them: those whose creator's pid (in the name) runs no process, once
    :data:`LATEST_GRACE_SECONDS` old. A pid since reused keeps its leftover until that process
    ends too: harmless, a symlink is a few bytes."""
    removed: list[Path] = []
    try:
        links = [(p, int(m[1])) for p in root.iterdir() if (m := LATEST_TEMPORARY.fullmatch(p.name))]
    except OSError:  # no runs folder yet, or one we cannot list: nothing to clean
        return removed
    for link, pid in links:
        try:
            young = time.time() - link.lstat().st_mtime < LATEST_GRACE_SECONDS
            if young or not link.is_symlink() or process_exists(pid):
                continue
            link.unlink()
        except OSError:  # renamed onto latest (or removed) meanwhile, or not ours to delete
            continue
        removed.append(link)
    return removed


def process_exists(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (another user's included)."""
    try:
        os.kill(pid, 0)  # signal 0: only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    except OverflowError:  # no pid is that large
        return False
    return True


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


def is_number(value: Any) -> bool:
    """An int or float that fits a float (tables format it), not a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:  # an int of 400 digits, say
        return False
    return True


def in_range(low: float | None, high: float | None) -> Callable[[Any], bool]:
    """A check that a value is a number in [low, high] (a bound of None: unbounded, NaN and infinities allowed)."""
    if low is None and high is None:
        return is_number
    return lambda v: is_number(v) and (low is None or float(v) >= low) and (high is None or float(v) <= high)


RECORD_FIELDS: dict[str, tuple[bool, str, Callable[[Any], bool]]] = {
    "train_acc": (True, "a number in [0, 1]", in_range(0.0, 1.0)),
    "global_loss": (True, "a number", in_range(None, None)),
    "test_acc": (True, "a number in [0, 1]", in_range(0.0, 1.0)),
    "test_loss": (True, "a number", in_range(None, None)),
    "train_seconds": (True, "a number of seconds >= 0", lambda v: in_range(0.0, None)(v) and math.isfinite(v)),
    "val_acc": (False, "a number in [0, 1]", in_range(0.0, 1.0)),
    "skipped_batches": (False, "a whole number >= 0", lambda v: is_number(v) and isinstance(v, int) and v >= 0),
}
"""Top-level keys of an epoch's record: key -> (required, what it must be, its check). ``blocks``,
``lr`` and a pipeline's ``stages``, ``stage_seconds`` and ``stage_busy_seconds`` are checked by
:func:`record_problem` itself; other keys are left alone (a newer layerwise may add some)."""


def record_problem(record: Any, epoch: int | None = None) -> str | None:
    """What keeps ``record`` from being an epoch's metrics as training writes them and every
    reader (resume, the epoch table, compare, plot, tune) reads them, as ``key: expected ...,
    found ...``; None when nothing. ``epoch``: the epoch it must be (a log's line number)."""
    if not isinstance(record, dict):
        return f"expected a mapping, found {describe(record)}"
    found = record.get("epoch")
    if isinstance(found, bool) or not isinstance(found, int):
        return f"epoch: expected a number of epochs, found {describe(found) if 'epoch' in record else 'no such key'}"
    if found < 1:
        return f"epoch: expected an epoch number of 1 or more, found {found}"
    if epoch is not None and found != epoch:
        return f"epoch: expected {epoch} (line N holds epoch N), found {found}"
    for key, (required, expected, valid) in RECORD_FIELDS.items():
        if key not in record:
            if required:
                return f"{key}: expected {expected}, found no such key"
        elif not (valid(record[key]) or (not required and record[key] is None)):
            return f"{key}: expected {expected}, found {describe(record[key])}"
    blocks = record.get("blocks")
    if not isinstance(blocks, dict):
        return (f"blocks: expected a mapping of block names to metrics, found "
                f"{describe(blocks) if 'blocks' in record else 'no such key'}")
    for block, metrics in blocks.items():
        if not isinstance(metrics, dict):
            return f"blocks.{block}: expected a mapping of metric names to numbers, found {describe(metrics)}"
        for name, value in metrics.items():
            if not is_number(value):
                return f"blocks.{block}.{name}: expected a number, found {describe(value)}"
    lrs = record.get("lr")
    if lrs is not None:
        if not isinstance(lrs, dict):
            return f"lr: expected a mapping of optimizer names to learning rates, found {describe(lrs)}"
        for name, value in lrs.items():
            if not (in_range(0.0, None)(value) and math.isfinite(value)):
                return f"lr.{name}: expected a learning rate >= 0, found {describe(value)}"
    return stages_problem(record)


def stages_problem(record: dict) -> str | None:
    """A pipeline's epoch (:mod:`layerwise.pipeline`): its stages' blocks and seconds, one of each per stage."""
    stages = record.get("stages")
    if stages is None:
        if "stage_seconds" in record or "stage_busy_seconds" in record:
            return "stages: expected the blocks of each stage beside stage_seconds, found no such key"
        return None
    if not isinstance(stages, list) or not all(
            isinstance(stage, list) and all(isinstance(b, str) for b in stage) for stage in stages):
        return f"stages: expected a list of each stage's block names, found {describe(stages)}"
    for key in ("stage_seconds", "stage_busy_seconds"):
        seconds = record.get(key)
        if not isinstance(seconds, list) or len(seconds) != len(stages) or not all(
                in_range(0.0, None)(s) and math.isfinite(s) for s in seconds):
            return (f"{key}: expected {len(stages)} numbers of seconds >= 0, one per stage, found "
                    f"{describe(seconds) if key in record else 'no such key'}")
    return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (none if it does not exist yet), each checked: line N is
    epoch N's whole record (:func:`record_problem`); a file that is not is refused in one line
    naming the line and the key, and nothing is read from it."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise LayerwiseError(f"{path}: cannot read this metrics log ({reason})") from None
    records = []
    fix = "fix that line, or delete it and the lines after it"
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict) or "epoch" not in record:
            raise LayerwiseError(f"{path}: line {number} is not an epoch record; {fix}")
        problem = record_problem(record, epoch=number)
        if problem is not None:
            raise LayerwiseError(printable(f"{path}: line {number}: {problem}; {fix}", keep_newlines=False))
        records.append(record)
    return records


NOISE_SPACES = ("pixel", "normalized")
"""The spaces ``layerwise eval --noise-space`` adds its noise in; each has reports of its own."""


def report_prefix(noise_space: str) -> str:
    """The start of a noise report's file name: ``noise`` in pixel space, ``noise-normalized``
    otherwise, so that results of the two spaces are never mixed."""
    return "noise" if noise_space == "pixel" else f"noise-{noise_space}"


def noise_space_option(noise_space: str) -> str:
    """What ``layerwise eval`` needs to write a report in ``noise_space``: `` --noise-space normalized``,
    or nothing for pixel space, the default."""
    return "" if noise_space == "pixel" else f" --noise-space {noise_space}"


def noise_report_path(run: Path, noise_space: str = "pixel") -> Path:
    """The run's latest ``layerwise eval`` report in ``noise_space``: ``eval/noise-latest.json``,
    or ``eval/noise-normalized-latest.json``."""
    return run / "eval" / f"{report_prefix(noise_space)}-latest.json"


def read_noise_report(run: Path, noise_space: str = "pixel") -> dict | None:
    """The run's latest ``layerwise eval`` report in ``noise_space`` (None when it has none), checked
    as far as ``compare`` and ``plot`` read it: ``results``, a list of ``{noise, acc}`` numbers, and
    the space it records (a report from before spaces were recorded is a pixel-space one)."""
    path = noise_report_path(run, noise_space)
    if not path.is_file():
        return None
    again = f"run 'layerwise eval {run}{noise_space_option(noise_space)}' again or delete it"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = exc.strerror if isinstance(exc, OSError) else "nested too deeply" if isinstance(
            exc, RecursionError) else str(exc)
        raise LayerwiseError(printable(f"{path}: not a readable eval report ({reason}); {again}",
                                       keep_newlines=False)) from None
    results = report.get("results") if isinstance(report, dict) else None
    if not isinstance(results, list) or not all(
            isinstance(r, dict) and in_range(0.0, None)(r.get("noise")) and in_range(0.0, 1.0)(r.get("acc"))
            for r in results):
        raise LayerwiseError(f"{path}: not an eval report (expected 'results': a list of {{noise, acc}}, "
                             f"each acc in [0, 1]); {again}")
    space = report.get("noise_space", "pixel")  # reports from before spaces were recorded are pixel ones
    if space != noise_space:
        found = describe(space) if "noise_space" in report else "no such key"
        raise LayerwiseError(printable(f"{path}: noise_space: expected {noise_space!r} (as the file's name says), "
                                       f"found {found}; {again}", keep_newlines=False))
    return report


def resolve_run(path: str | Path | None, runs_root: str | Path = "runs") -> Path:
    """A run folder or checkpoint path given by the user, or ``runs/latest``."""
    if path is not None:
        return Path(path)
    latest = Path(runs_root) / LATEST
    if not latest.exists():
        raise LayerwiseError(f"no run given and {latest} does not exist; train first or pass a run folder")
    return latest.resolve()
