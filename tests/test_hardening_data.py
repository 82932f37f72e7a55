"""Adversarial review, data and process faults: each test is one fault that used to give a traceback,
a wrong result, a leftover file, a hung or orphaned process, or an unreadable message.

- bad labels and empty splits, in the dataset files and in the decoded cache;
- temporaries of cache writes killed half-way;
- the missing-dataset message, the piped console, the epoch table's local accuracy;
- a disabled plugin's names, `plot --help`, the README's command list, the recipes' headers;
- several processes: the collective timeout, workers dying with their launcher, and a failed
  worker reported in one line.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from layerwise import data, distributed, plugins, progress
from layerwise.errors import DataError, LayerwiseError
from tests.helpers import REPO, assert_one_line_error, process_tree, tiny_recipe

# --------------------------------------------------------------------------- fake datasets


@pytest.fixture
def no_mirrors(monkeypatch):
    """Search only the data root the test gives, never the real data beside the repository."""
    monkeypatch.setattr(data, "MIRROR_DIRS", [])
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)


def write_idx(path: Path, values: torch.Tensor) -> None:
    """Write uint8 ``values`` as a gzipped IDX file."""
    header = bytes([0, 0, 0x08, values.dim()]) + b"".join(struct.pack(">I", d) for d in values.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(values.flatten().tolist()))


def write_split(root: Path, split: str, labels: list[int]) -> Path:
    """A fake MNIST split under ``root/mnist`` with these labels; returns the label file."""
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    image_file, label_file = data.IDX_FILES[split]
    images = torch.randint(0, 256, (len(labels), 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_idx(folder / f"{image_file}.gz", images)
    write_idx(folder / f"{label_file}.gz", torch.tensor(labels, dtype=torch.uint8))
    return folder / f"{label_file}.gz"


def mnist() -> data.DatasetSpec:
    return {spec.name: spec for spec in data.builtin_datasets()}["mnist"]


def write_recipe(folder: Path, **data_overrides) -> str:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**data_overrides)))
    return str(path)


# --------------------------------------------------------------------------- labels and sizes


@pytest.mark.parametrize("bad", [10, 255])
def test_a_label_outside_the_classes_names_the_label_file(tmp_path, no_mirrors, bad):
    label_file = write_split(tmp_path, "train", [3, 1, 4, bad, 5, bad])
    with pytest.raises(DataError) as info:
        data.load_split(mnist(), "train", tmp_path)
    message = str(info.value)
    assert message.startswith(f"{label_file}: dataset 'mnist' (train split) has 2 label(s) outside 0..9")
    assert f"(the first: {bad} at sample 3)" in message
    assert not (tmp_path / "cache" / "mnist-train.pt").exists(), "bad data is never cached"


def test_bad_labels_are_one_line_from_train_before_any_run_folder(tmp_path, no_mirrors, cli):
    write_split(tmp_path / "data", "train", [0, 1, 2, 3])
    label_file = write_split(tmp_path / "data", "test", [9, 10])
    result = cli("train", write_recipe(tmp_path, batch_size=2), "--data-root", str(tmp_path / "data"),
                 "--runs-dir", str(tmp_path / "runs"), "--no-progress")
    assert_one_line_error(result, f"{label_file}: dataset 'mnist' (test split) has 1 label(s) outside 0..9")
    assert not (tmp_path / "runs").exists()


def test_bad_labels_in_the_cache_are_rebuilt_from_the_files(tmp_path, no_mirrors):
    write_split(tmp_path, "train", [3, 1, 4, 1, 5])
    images, labels = data.load_split(mnist(), "train", tmp_path)
    cache = tmp_path / "cache" / "mnist-train.pt"
    for damaged in ([3, 1, 4, 1, 12], [3, -1, 4, 1, 5]):  # as a damaged or replaced cache could hold
        torch.save({"images": images, "labels": torch.tensor(damaged)}, cache)
        again = data.load_split(mnist(), "train", tmp_path)
        assert again[1].tolist() == [3, 1, 4, 1, 5]
        assert torch.load(cache, weights_only=True)["labels"].tolist() == [3, 1, 4, 1, 5], "and rewritten"


def test_an_empty_test_set_is_an_error_not_an_accuracy_of_zero(tmp_path, no_mirrors, cli):
    root = tmp_path / "data"
    write_split(root, "train", [0, 1, 2, 3, 4, 5])
    write_split(root, "test", [6, 7])
    trained = cli("train", write_recipe(tmp_path, batch_size=2), "--data-root", str(root),
                  "--runs-dir", str(tmp_path / "runs"), "--no-progress")
    assert trained.code == 0, trained.err
    label_file = write_split(root, "test", [])  # the test set is now empty
    (root / "cache" / "mnist-test.pt").unlink()
    result = cli("eval", str(tmp_path / "runs" / "latest"), "--data-root", str(root), "--device", "cpu")
    assert_one_line_error(result, f"{label_file}: dataset 'mnist' (test split) has no samples")
    assert not list((tmp_path / "runs" / "latest").glob("eval/noise-*.json")), "no report of an accuracy of 0"


def test_cifar_labels_are_checked_per_file(tmp_path, no_mirrors):
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "test_batch.bin").write_bytes(bytes([4]) + bytes(3072) + bytes([10]) + bytes(3072))
    spec = {spec.name: spec for spec in data.builtin_datasets()}["cifar10"]
    with pytest.raises(DataError, match=r"test_batch\.bin: dataset 'cifar10' has 1 label\(s\) outside 0\.\.9 "
                                        r"\(the first: 10 at sample 1\)"):
        data.load_split(spec, "test", tmp_path)


def negative_labels(split, search_dirs):
    """A plugin's loader with a bug: a label of -1."""
    return torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, -1, 2])


def test_a_plugin_loader_with_bad_labels_is_named(tmp_path, no_mirrors):
    spec = data.DatasetSpec("plugged", (1, 28, 28), 3, (0.5,), (0.5,), negative_labels)
    with pytest.raises(DataError) as info:
        data.load_split(spec, "test", tmp_path)
    assert str(info.value).startswith(
        f"the labels from loader {__name__}.negative_labels: dataset 'plugged' (test split) has 1 label(s) "
        "outside 0..2 (the first: -1 at sample 1)")


# --------------------------------------------------------------------------- cache temporaries


def test_temporaries_of_killed_cache_writes_are_removed_at_the_next_load(tmp_path, no_mirrors):
    write_split(tmp_path, "train", [1, 2])
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".mnist-train.pt.k1ll3d.tmp"  # as _write_cache names them
    running = cache / ".mnist-test.pt.wr1t1ng.tmp"  # another process's write, still going on
    for path in (stale, running):
        path.write_bytes(bytes(1000))
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    data.load_split(mnist(), "train", tmp_path)
    assert not stale.exists()
    assert running.exists(), "a write in progress is left alone"
    assert (cache / "mnist-train.pt").is_file()


def test_a_cache_write_killed_by_sigkill_leaves_a_temporary_that_the_next_load_removes(tmp_path, no_mirrors):
    write_split(tmp_path, "train", [1, 2])
    script = textwrap.dedent(f"""
        import os, signal, torch
        from layerwise import data

        def save_then_die(obj, f, *args, **kwargs):  # killed in the middle of writing the cache
            f.write(b"half a cache")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        data.MIRROR_DIRS[:] = []
        torch.save = save_then_die
        spec = {{s.name: s for s in data.builtin_datasets()}}["mnist"]
        data.load_split(spec, "train", {str(tmp_path)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    left = list((tmp_path / "cache").glob(".*.tmp"))
    assert len(left) == 1, "the fault: a kill leaves the temporary behind"
    past = time.time() - data.STALE_TEMPORARY_SECONDS - 1
    os.utime(left[0], (past, past))
    data.load_split(mnist(), "train", tmp_path)
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / "mnist-train.pt"]


def test_ctrl_c_during_a_cache_write_leaves_no_temporary(tmp_path, no_mirrors, monkeypatch):
    write_split(tmp_path, "train", [1, 2])

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"half a cache")
        raise KeyboardInterrupt

    monkeypatch.setattr(data.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load_split(mnist(), "train", tmp_path)
    assert list((tmp_path / "cache").iterdir()) == []


# --------------------------------------------------------------------------- messages and output


def test_a_missing_dataset_says_what_is_missing_on_its_first_line(tmp_path, no_mirrors, cli):
    result = cli("train", write_recipe(tmp_path), "--data-root", str(tmp_path / "empty"),
                 "--runs-dir", str(tmp_path / "runs"))
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert lines[0] == ("error: dataset 'mnist' (train split) not found: no data folder has "
                        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz (gzipped or not)")
    details = "\n".join(lines[1:])  # the detail is kept, after the error
    assert f"  {tmp_path / 'empty' / 'mnist'}" in details and f"  {tmp_path / 'empty' / 'MNIST' / 'raw'}" in details
    assert "--data-root DIR" in details and "$LAYERWISE_DATA/mnist" in details


@pytest.mark.parametrize("name", ["stdout", "stderr"])
def test_piped_output_never_wraps_a_long_path(monkeypatch, name):
    console = getattr(progress, name)  # the CLI's own console, writing to whatever sys.stdout/stderr is
    piped = io.StringIO()
    monkeypatch.setattr(sys, name, piped)
    path = f"/work/main/runs/{'noise-study-' * (console.width // 12)}20261201-063623/eval/noise-20261201-063623.json"
    assert len(path) > console.width
    console.print(f"Report: {path}")
    assert piped.getvalue() == f"Report: {path}\n"
    # On a terminal, rich still wraps long text at the width.
    terminal = io.StringIO()
    progress.PipeFriendlyConsole(file=terminal, width=80, force_terminal=True, color_system=None).print(path)
    assert "\n" in terminal.getvalue().rstrip("\n")


def test_the_epoch_table_shows_local_accuracy_as_a_percentage():
    history = [{"epoch": 1, "train_acc": 0.5, "test_acc": 0.6, "global_loss": 1.0,
                "blocks": {"ce1": {"loss": 0.4, "acc": 0.9312}}}]
    console = progress.PipeFriendlyConsole(file=io.StringIO(), width=200, record=True)
    console.print(progress.epoch_table(history))
    text = console.export_text()
    assert "93.12%" in text and "0.9312" not in text


@pytest.fixture
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


@pytest.mark.skipif(importlib.util.find_spec("layerwise_localce") is None, reason="localce plugin not installed")
def test_a_disabled_plugins_objective_names_the_disabled_plugin(fresh_plugins, monkeypatch, cli, tmp_path):
    monkeypatch.setenv("LAYERWISE_DISABLE_PLUGINS", "layerwise-localce")
    plugins.reset()
    with pytest.raises(LayerwiseError) as info:
        plugins.registries().objectives.get("localce")
    assert str(info.value).startswith("unknown objective 'localce'")
    assert str(info.value).endswith("; plugins disabled by LAYERWISE_DISABLE_PLUGINS, which may provide it: "
                                    "localce (layerwise-localce)")
    recipe = tiny_recipe()
    recipe["model"]["subnetworks"][0]["blocks"][0]["objective"] = "localce"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("validate", str(tmp_path / "r.yaml"))
    assert_one_line_error(result, "unknown objective 'localce'", "disabled by LAYERWISE_DISABLE_PLUGINS",
                          "localce (layerwise-localce)")


def test_plot_help_keeps_the_extra_name_and_the_readme_lists_plot(cli):
    result = cli("plot", "--help")
    assert result.code == 0
    assert "(needs layerwise[plot])" in " ".join(result.out.split())
    assert "\nlayerwise plot " in (REPO / "README.md").read_text()


def test_the_hsic_recipes_say_plainly_how_their_head_is_trained():
    from layerwise.shipped import describe, shipped_recipes

    for name in ("mnist_hsic", "cifar10_hsic"):
        line = describe(shipped_recipes()[name])
        assert "then a linear head trained alone by cross-entropy" in line
        assert "format-trained" not in line


# --------------------------------------------------------------------------- several processes


@pytest.mark.parametrize(("value", "seconds"), [(None, 300), ("2.5", 2.5), (" 600 ", 600)])
def test_the_collective_timeout_comes_from_the_environment(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    assert distributed.collective_timeout() == timedelta(seconds=seconds)


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_a_bad_timeout_is_one_line_before_anything_is_launched(monkeypatch, cli, tmp_path, value):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    monkeypatch.setattr(distributed.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    result = cli("train", write_recipe(tmp_path), "--nproc", "2")
    assert_one_line_error(result, f"LAYERWISE_DIST_TIMEOUT: expected a number of seconds > 0, found '{value}'")


def test_joined_gives_the_process_group_the_timeout(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", distributed.TIMEOUT_ENV: "7"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(distributed.LAUNCHER_PID_ENV, raising=False)
    calls = []
    monkeypatch.setattr(distributed, "die_with_parent", lambda *args: calls.append(("die_with_parent", args)))

    class Stop(Exception):
        pass

    def init_process_group(backend, **kwargs):
        calls.append((backend, kwargs))
        raise Stop

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    with pytest.raises(Stop), distributed.joined(torch.device("cpu"), 64):
        pass
    assert calls == [("die_with_parent", (signal.SIGKILL, None)), ("gloo", {"timeout": timedelta(seconds=7)})]


TIMEOUT_SCRIPT = """
import time, torch
from layerwise.distributed import joined

with joined(torch.device("cpu"), 2) as group:
    if group.rank == 1:
        time.sleep(20)  # stopped, hung: never reaches the collective
    started = time.monotonic()
    try:
        group.any(False)
    finally:
        print(f"waited {time.monotonic() - started:.1f}", flush=True)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.integration
def test_a_rank_left_waiting_fails_after_the_timeout_with_one_line(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(TIMEOUT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           distributed.TIMEOUT_ENV: "2", "COLUMNS": "300"}
    # The port is free when probed, but another process (under pytest-xdist, another worker's test)
    # may take it before rank 0 listens on it. joined() rendezvouses through $MASTER_PORT (env://),
    # with no way to hand it a port already bound, so start again on a new port when that happened.
    for _ in range(3):
        port = free_port()
        ranks = [subprocess.Popen([sys.executable, str(script)],
                                  env={**env, "MASTER_PORT": str(port), "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        try:
            out, err = ranks[0].communicate(timeout=60)
        finally:
            ranks[1].kill()
            ranks[1].communicate()
        if "EADDRINUSE" not in err:  # torch's TCPStore: "... code: -98, name: EADDRINUSE, ..."
            break
    waited = float(out.split("waited ")[1])
    assert 1.5 < waited < 10, "the 2 s of LAYERWISE_DIST_TIMEOUT, not gloo's 30 minutes"
    assert ("rank 0: the other processes did not answer within 2 s ($LAYERWISE_DIST_TIMEOUT); one of them is "
            "stopped, hung or much slower") in " ".join(err.split())


PARENT_SCRIPT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == sys.argv[2], "the child reports how it watches its parent"
print(child.pid, flush=True)
time.sleep(120)
"""

CHILD_SCRIPT = """
import sys, time
if {watchdog}:
    sys.platform = "elsewhere"  # as on a system without prctl
from layerwise.distributed import die_with_parent
print(die_with_parent(), flush=True)
time.sleep(120)
"""


def gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` has ended (a zombie counts: it no longer runs) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["prctl", "watchdog"])
def test_a_worker_dies_when_its_parent_is_killed(how):
    child_script = CHILD_SCRIPT.format(watchdog=how == "watchdog")
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, child_script, how], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    try:
        assert not gone(child, 0.5), "it lives as long as its parent"
        parent.kill()  # SIGKILL: the parent can pass nothing on
        parent.wait()
        assert gone(child, 5), "the child did not die with its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_parent_that_died_before_the_watch_began_is_noticed():
    code = "from layerwise.distributed import die_with_parent; die_with_parent(expected_parent=1); print('alive')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -signal.SIGKILL and "alive" not in done.stdout


def worker_rank(pid: int) -> int | None:
    """The RANK torchrun gave process ``pid``, or None for a process that is not a worker."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [entry[5:] for entry in environ if entry.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.integration
@pytest.mark.parametrize("victim", ["worker", "torchrun"])
def test_a_killed_worker_or_torchrun_is_one_line_with_the_resume_command(tmp_path, mnist_available, victim):
    recipe = tiny_recipe(train_limit=2048)
    recipe["train"]["epochs"] = 50  # far longer than the test: the kill always lands mid-run
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    launcher = subprocess.Popen([sys.executable, "-m", "layerwise", "train", "tiny.yaml", "--nproc", "2",
                                 "--runs-dir", "runs", "--no-progress"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not list((tmp_path / "runs").glob("*/state.safetensors")):  # epoch 1 saved
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.05)
        tree = process_tree(launcher.pid)
        workers = {worker_rank(pid): pid for pid in tree if worker_rank(pid) is not None}
        torchrun = [pid for pid in tree if pid != launcher.pid and pid not in workers.values()]
        assert sorted(workers) == [0, 1] and len(torchrun) == 1, tree
        os.kill(workers[1] if victim == "worker" else torchrun[0], signal.SIGKILL)
        launcher.wait(timeout=60)  # its output is a few lines: no pipe fills up meanwhile
        assert all(gone(pid, 10) for pid in tree), "no process trains on after the kill"
        _, err = launcher.communicate(timeout=10)  # ends at once: the workers, which share its pipes, are gone
    finally:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()
    run = (tmp_path / "runs" / "latest").resolve()
    assert launcher.returncode == 128 + signal.SIGKILL
    assert "Traceback" not in err and "ChildFailedError" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    who = ("rank 1 of 2 was killed by SIGKILL, so torchrun stopped the others" if victim == "worker" else
           "torchrun, which ran the 2 processes, was killed by SIGKILL; its workers stop with it")
    assert errors == [f"error: {who}. Resume the run with: layerwise train --resume {run} --nproc 2"], err
