"""Block-parallel training (layerwise.pipeline): `layerwise train R --stages N` runs the network as
a pipeline of N processes, one stage of blocks each, and trains the weights of one process.

- end to end on real MNIST: every tensor of model.safetensors (and of the resume state) is
  bit-identical to a one-process run's, for HSIC-only, local-cross-entropy and hybrid networks;
- a pipeline killed after an epoch resumes in 2 stages or in one process, bit-identically;
- a stage that is killed or stopped ends the whole run within a bounded time, with one line that
  names the stage and the command that resumes, and no process left behind;
- with data parallelism (`--nproc 2 --stages 2`): the weights of `--nproc 2` alone, bit for bit;
- the CLI: `validate --stages`, what `train --stages` launches, and what it refuses before launching.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from layerwise import distributed
from layerwise.pipeline import STAGES_ENV
from tests.helpers import (
    REPO,
    CliResult,
    assert_one_line_error,
    assert_same_tensors,
    call_main,
    epochs_in_metrics,
    process_tree,
)

RECIPES = REPO / "recipes"

# Small and quick: 8 (nHSIC) or 4 batches of 256 per epoch, the whole test set evaluated.
HSIC = (str(RECIPES / "mnist_hsic.yaml"), "train.epochs=2", "data.train_limit=2048", "train.device=cpu")
HYBRID = (str(RECIPES / "mnist_hybrid.yaml"), "train.epochs=1", "data.train_limit=1024", "train.device=cpu")

# Three local cross-entropy blocks and a detached head: no global gradient crosses any cut.
LOCALCE = {
    "name": "localce_stack",
    "seed": 0,
    "data": {"dataset": "mnist", "batch_size": 256, "train_limit": 1024},
    "model": {"subnetworks": [
        {"name": "local", "blocks": [
            {"name": "ce1", "layer": "linear", "out": 256, "act": "relu", "objective": {"name": "localce"}},
            {"name": "ce2", "layer": "linear", "out": 128, "act": "relu", "objective": {"name": "localce"}},
            {"name": "ce3", "layer": "linear", "out": 128, "act": "relu", "objective": {"name": "localce"}},
        ]},
        {"name": "format", "blocks": [{"name": "head", "layer": "linear", "out": 10, "detach": True}]},
    ]},
    "optim": {"local": {"name": "adam", "lr": 1.0e-3}, "global": {"name": "adam", "lr": 1.0e-3}},
    "train": {"epochs": 1, "device": "cpu"},
}

BLOCKS = {"hsic": ["hsic1", "hsic2", "hsic3", "hsic4", "hsic5", "head"], "localce": ["ce1", "ce2", "ce3", "head"],
          "hybrid": ["hsic1", "bp1", "hsic2", "head"]}


def subprocess_env(**extra: str) -> dict[str, str]:
    """One thread per process (the stages share the cores), no stage count inherited."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200", **extra}
    env.pop(STAGES_ENV, None)
    return env


def train(*args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``layerwise train ARGS --no-progress`` in a subprocess, to the end."""
    return subprocess.run([sys.executable, "-m", "layerwise", "train", *args, "--no-progress"], cwd=cwd,
                          env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)


def train_here(*args: str) -> CliResult:
    """``layerwise train ARGS --no-progress`` in this process, to the end: one process's run without
    a Python and torch start-up. In one thread, as the stages run (``OMP_NUM_THREADS=1``), so that
    its sums are theirs; no stage count in the environment."""
    threads, stages = torch.get_num_threads(), os.environ.pop(STAGES_ENV, None)
    out, err = io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = call_main("train", *args, "--no-progress")
    finally:
        torch.set_num_threads(threads)
        if stages is not None:
            os.environ[STAGES_ENV] = stages
    return CliResult(code, out.getvalue(), err.getvalue())


def torchrun(nproc: int, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC -m layerwise train ARGS --no-progress``, to the end:
    the workers ``layerwise train ARGS --nproc NPROC`` starts, without the process that launches them
    (for a reference run: one Python and torch start-up fewer)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "layerwise", "train", *args, "--no-progress"], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def start_train(*args: str, cwd: Path, **env: str) -> subprocess.Popen:
    """``layerwise train ARGS --no-progress`` in the background."""
    return subprocess.Popen([sys.executable, "-m", "layerwise", "train", *args, "--no-progress"], cwd=cwd,
                            env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def latest(runs: Path) -> Path:
    return (runs / "latest").resolve()


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path, stages: int = 1) -> None:
    """The weights, the resume state and the metrics of ``run`` are those of the one-process ``reference``.

    A pipeline's state also holds the generator of every other stage (``rng/torch/rankR``)."""
    assert_same_tensors(run / "model.safetensors", reference / "model.safetensors")
    state, expected = load_file(run / "state.safetensors"), load_file(reference / "state.safetensors")
    assert set(state) - set(expected) <= {f"rng/torch/rank{r}" for r in range(1, max(stages, 2))}
    assert set(expected) <= set(state)
    different = [name for name in expected if not (state[name].dtype == expected[name].dtype
                                                  and state[name].equal(expected[name]))]
    assert not different, f"state tensors differ: {different}"
    got, want = records(run), records(reference)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert (a["test_acc"], a["train_acc"]) == (b["test_acc"], b["train_acc"]), (a, b)


@pytest.fixture(scope="module")
def localce_recipe(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("recipes") / "localce_stack.yaml"
    path.write_text(yaml.safe_dump(LOCALCE))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(*args)``: the run folder of ``layerwise train ARGS`` in one process, trained once per
    module (here, in this process: see :func:`train_here`)."""
    done: dict[tuple[str, ...], Path] = {}

    def run(*args: str) -> Path:
        if args not in done:
            folder = tmp_path_factory.mktemp("reference")
            result = train_here(*args, "--runs-dir", str(folder / "runs"))
            assert result.code == 0, result.err[-3000:]
            done[args] = latest(folder / "runs")
        return done[args]

    return run


# --------------------------------------------------------------------------- exactness


@pytest.mark.integration
# Two stages are covered by localce and the hybrid (and by the fault and --nproc tests, on mnist_hsic);
# mnist_hsic runs in 4, one block per stage.
@pytest.mark.parametrize(("network", "stages"), [("hsic", 4), ("localce", 2), ("hybrid", 2)],
                         ids=["mnist_hsic-4", "localce-2", "mnist_hybrid-2"])
def test_stages_train_the_weights_of_one_process(network, stages, tmp_path, reference, localce_recipe,
                                                 mnist_available):
    if network == "localce":
        pytest.importorskip("layerwise_localce")
    args = {"hsic": HSIC, "hybrid": HYBRID, "localce": (localce_recipe,)}[network]
    expected = reference(*args)

    done = train(*args, "--stages", str(stages), "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"in {stages} processes" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count("Run folder:") == 1, "only stage 0 prints"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]) == 1, "stage 0 alone makes a folder"
    run = latest(tmp_path / "runs")

    assert_same_run(run, expected, stages)
    for record in records(run):
        assert len(record["stage_seconds"]) == stages
        assert len(record["stage_busy_seconds"]) == stages
        assert all(seconds >= 0 for seconds in record["stage_seconds"])
        assert len(record["stages"]) == stages and all(record["stages"]), record["stages"]
        assert [name for stage in record["stages"] for name in stage] == BLOCKS[network]
    if network == "hybrid":
        assert records(run)[0]["stages"] == [["hsic1"], ["bp1", "hsic2", "head"]]


# --------------------------------------------------------------------------- faults and resume


def stage_process(launcher: subprocess.Popen, stage: int, timeout: float = 60) -> int:
    """The pid of the worker that runs ``stage`` (torchrun's LOCAL_RANK), a grandchild of the launcher."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in process_tree(launcher.pid):
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if f"LOCAL_RANK={stage}".encode() in environ and b"train" in command:
                    return pid
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.25)  # each look reads every /proc/*/stat: CPU the starting workers need
    raise AssertionError(f"no worker for stage {stage} within {timeout}s")


def wait_for_epochs(runs: Path, launcher: subprocess.Popen, epochs: int, timeout: float = 180) -> None:
    """Poll until the launched run has ``epochs`` lines in its metrics.jsonl."""
    deadline = time.monotonic() + timeout
    metrics = runs / "latest" / "metrics.jsonl"
    while True:
        with contextlib.suppress(OSError):
            if metrics.read_text().count("\n") >= epochs:
                return
        if launcher.poll() is not None:
            raise AssertionError(f"the run ended before epoch {epochs} was saved: {launcher.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"epoch {epochs} was not saved within {timeout}s")
        time.sleep(0.005)


def started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), to tell it from a later process given the same
    pid; None once it has ended (a zombie waiting for its parent has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def snapshot(launcher: subprocess.Popen) -> dict[int, str | None]:
    """The launcher and its descendants (torchrun and the stages), each with its start time."""
    return {pid: started(pid) for pid in process_tree(launcher.pid)}


def still_running(tree: dict[int, str | None]) -> list[int]:
    """The processes of ``tree`` that have not ended."""
    return [pid for pid, start in tree.items() if start is not None and started(pid) == start]


def release(tree: dict[int, str | None]) -> None:
    """Whatever the test left running of ``tree``, resumed and killed (only those very processes)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        for pid in still_running(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def pending_signals(pid: int) -> int:
    """The signals sent to process ``pid`` and not yet delivered (a mask, bit N-1 for signal N)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no ShdPnd in /proc/{pid}/status")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def signal_stage_1(launcher, runs, sig: int, timeout: float, then=None):
    """Once epoch 1 is saved, send ``sig`` to stage 1's worker (and call ``then(pid)`` with its pid, if
    given); return the launcher's stderr, the seconds it took to end after the signal, and the
    processes of its tree still alive then."""
    tree: dict[int, str | None] = {}
    try:
        victim = stage_process(launcher, 1)
        wait_for_epochs(runs, launcher, 1)
        tree = snapshot(launcher)  # the launcher, torchrun and both stages
        assert victim in tree and len(tree) >= 4, tree
        os.kill(victim, sig)
        signalled = time.monotonic()
        if then is not None:
            then(victim)
        _, err = launcher.communicate(timeout=timeout)
        return err, time.monotonic() - signalled, still_running(tree)
    finally:
        launcher.kill()
        release(tree)


@pytest.mark.integration
def test_a_killed_stage_ends_the_run_and_it_resumes_bit_identically(tmp_path, reference, mnist_available):
    from layerwise.resume import STATE_FILE, load_state

    expected = reference(*HSIC)
    runs = tmp_path / "runs"
    launcher = start_train(*HSIC, "--stages", "2", "--runs-dir", "runs", cwd=tmp_path)
    err, took, left = signal_stage_1(launcher, runs, signal.SIGKILL, timeout=60)  # in epoch 2
    assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert took < 60
    assert left == [], "every process of the run ended with it"

    run = latest(runs)
    assert load_state(run / STATE_FILE).epoch == 1, "the kill must land before epoch 2 is saved"
    assert epochs_in_metrics(run) == [1]
    assert "Traceback" not in err
    command = f"layerwise train --resume {run} --stages 2"
    named = [line for line in error_lines(err) if "stage 1 of 2" in line]
    assert len(named) == 1, err[-3000:]
    assert "SIGKILL" in named[0] and named[0].endswith(command), named[0]
    elsewhere = tmp_path / "copy" / run.name
    shutil.copytree(run, elsewhere)

    # The same state continues in one process, exactly: the stages split blocks, not batches ...
    alone = train_here("--resume", str(elsewhere))
    assert alone.code == 0, alone.err[-3000:]
    assert f"resuming {elsewhere} after epoch 1 of 2" in " ".join(alone.err.split())
    assert_same_run(elsewhere, expected)
    assert load_state(elsewhere / STATE_FILE).processes == 1

    # ... and the command it printed continues the run in 2 stages.
    resumed = train("--resume", str(run), "--stages", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert f"resuming {run} after epoch 1 of 2 in 2 processes" in " ".join(resumed.stderr.split())
    assert_same_run(run, expected, stages=2)


def kill_when_torchrun_closes(victim: int, timeout: float = 60) -> None:
    """Wait until torchrun has sent its SIGTERM to the stopped ``victim`` (it waits there, pending: a
    stopped process takes no signal but SIGKILL), then send the SIGKILL torchrun sends 30 s later."""
    deadline = time.monotonic() + timeout
    while not pending_signals(victim) & 1 << (signal.SIGTERM - 1):
        assert time.monotonic() < deadline, f"torchrun did not close the stopped stage within {timeout} s"
        time.sleep(0.1)
    os.kill(victim, signal.SIGKILL)


@pytest.mark.integration
def test_a_stopped_stage_times_the_run_out(tmp_path, mnist_available):
    runs = tmp_path / "runs"
    launcher = start_train(*HSIC, "--stages", "2", "--runs-dir", "runs", cwd=tmp_path, LAYERWISE_DIST_TIMEOUT="10")
    # Hung: its sockets stay open, only the timeout can tell. Stage 0 gives up after 10 s and exits,
    # and torchrun closes the other stage: SIGTERM, then SIGKILL after a 30 s grace, which the test
    # cuts short (the run's part is done once the SIGTERM is sent).
    err, took, left = signal_stage_1(launcher, runs, signal.SIGSTOP, timeout=90, then=kill_when_torchrun_closes)
    assert launcher.returncode not in (0, None), err[-3000:]
    assert took < 90
    assert left == [], "every process of the run ended with it"
    assert "Traceback" not in err
    text = " ".join(err.split())
    assert "within 10 s ($LAYERWISE_DIST_TIMEOUT)" in text, err[-3000:]
    run = latest(runs)
    assert any(f"layerwise train --resume {run} --stages 2" in line for line in error_lines(err)), err[-3000:]
    assert epochs_in_metrics(run) == [1], "the saved epoch is kept"


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if anything is launched; keep the stage count the CLI sets from leaking out."""
    monkeypatch.setenv(STAGES_ENV, "")  # restored (removed) after the test, whatever the CLI set

    def refuse(*args, **kwargs):
        raise AssertionError(f"launched {args}")

    monkeypatch.setattr(distributed.subprocess, "Popen", refuse)


def test_validate_prints_each_stages_blocks(cli):
    result = cli("validate", str(RECIPES / "mnist_hybrid.yaml"), "--stages", "2")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert any(line.startswith("stage 0: hsic1 (") for line in lines), result.out
    assert any(line.startswith("stage 1: bp1, hsic2, head (") for line in lines), result.out
    assert any(line.startswith("free cuts: after hsic1; not free: after bp1") for line in lines), result.out


def test_named_cuts_place_the_stages_and_must_be_free(cli):
    result = cli("validate", str(RECIPES / "mnist_hsic.yaml"), "train.cuts=[hsic4]", "--stages", "2")
    assert result.code == 0, result.err
    assert any(line.startswith("stage 0: hsic1, hsic2, hsic3, hsic4 (") for line in result.out.splitlines())
    refused = cli("validate", str(RECIPES / "mnist_hybrid.yaml"), "train.cuts=[bp1]", "--stages", "2")
    assert refused.code == 2 and "the cut after 'bp1' is not free" in refused.err
    contradiction = cli("validate", str(RECIPES / "mnist_hsic.yaml"), "train.cuts=[hsic4]", "train.stages=3")
    assert contradiction.code == 2 and "train.stages: train.cuts names 1 cut(s), so 2 stages" in contradiction.err


@pytest.mark.parametrize("command", [["validate", "mnist_hybrid", "--stages", "3"],
                                     ["train", "mnist_hybrid", "--stages", "3"],
                                     ["train", "mnist_hybrid", "train.stages=3"]],
                         ids=["validate", "train", "recipe"])
def test_a_cut_that_is_not_free_is_refused_before_launching(cli, no_launch, command):
    recipe = str(RECIPES / f"{command[1]}.yaml")
    result = cli(command[0], recipe, *command[2:])
    assert_one_line_error(result, "cannot cut into 3 stages", "not free", "'bp1'")


@pytest.mark.parametrize(("setting", "fragment"), [("train.on_nonfinite=skip", "train.on_nonfinite: skip"),
                                                   ("train.precision=bf16", "train.precision: bf16")])
def test_what_a_pipeline_cannot_run_exactly_is_refused_before_launching(cli, no_launch, setting, fragment):
    result = cli("train", str(RECIPES / "mnist_hsic.yaml"), "--stages", "2", setting)
    assert_one_line_error(result, fragment, "2 pipeline stages")


@pytest.mark.parametrize("command", ["train", "validate"])
def test_zero_stages_are_refused(cli, no_launch, command):
    result = cli(command, str(RECIPES / "mnist_hsic.yaml"), "--stages", "0")
    assert_one_line_error(result, "--stages: expected a number of", ">= 1, found 0")


def test_nproc_with_stages_launches_replicas_of_the_pipeline(cli, monkeypatch):
    commands = []

    class FakePopen:
        def __init__(self, command, env, **kwargs):
            commands.append((command, env.get(STAGES_ENV)))

        def wait(self):
            return 7

    monkeypatch.setenv(STAGES_ENV, "")  # restored (removed) after the test, whatever the CLI set
    monkeypatch.setattr(distributed.subprocess, "Popen", FakePopen)
    recipe = str(RECIPES / "mnist_hsic.yaml")
    result = cli("train", recipe, "--nproc", "2", "--stages", "2", "--runs-dir", "r", "--no-progress")
    assert result.code == 7, "the exit code is torchrun's"
    assert "Traceback" not in result.err
    # 2 replicas of 2 stages: 4 processes, told the stage count through the environment
    assert commands == [([sys.executable, "-m", "layerwise.distributed", "--standalone", "--nproc_per_node", "4",
                          "-m", "layerwise", "train", recipe, "--runs-dir", "r", "--no-progress"], "2")]


def test_nproc_with_stages_refuses_a_batch_that_does_not_split_over_the_replicas(cli, no_launch):
    result = cli("train", str(RECIPES / "mnist_hsic.yaml"), "data.batch_size=255", "--nproc", "2", "--stages", "2")
    assert_one_line_error(result, "data.batch_size 255 does not split evenly over 2 processes")


@pytest.mark.integration
def test_nproc_with_stages_trains_the_weights_of_nproc_alone(tmp_path, mnist_available):
    # Data parallelism is exact only up to float rounding against one process; a pipeline of
    # replicas is bit-identical to the same replicas without stages (the same sums, over 2 ranks).
    args = (*HSIC[:1], "train.epochs=1", *HSIC[2:])
    expected = torchrun(2, *args, "--runs-dir", "dp", cwd=tmp_path)  # as `--nproc 2` would start them
    assert expected.returncode == 0, expected.stderr[-3000:]
    done = train(*args, "--nproc", "2", "--stages", "2", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 4 processes" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count("Run folder:") == 1, "only stage 0 of replica 0 prints"
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]) == 1
    run, reference = latest(tmp_path / "runs"), latest(tmp_path / "dp")
    assert_same_tensors(run / "model.safetensors", reference / "model.safetensors")
    got, want = records(run), records(reference)
    assert [(r["test_acc"], r["train_acc"]) for r in got] == [(r["test_acc"], r["train_acc"]) for r in want]
    assert [len(r["stage_seconds"]) for r in got] == [2]
