"""Faults and bad input: kills, Ctrl-C, torn writes, corrupt files, NaN, read-only and full disks.

docs/reliability.md lists each fault, what the user sees and what survives, and names the test
here that proves it. Tests that train on real MNIST are marked ``integration``; those that run
``layerwise`` as a subprocess and kill it use a tiny network so they take seconds.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import layerwise.train_run
from layerwise.checkpoint import WEIGHTS_FILE, load_checkpoint
from layerwise.resume import STATE_FILE, load_state
from tests.helpers import (
    REPO,
    SHARED_DATA,
    assert_one_line_error,
    assert_same_tensors,
    epochs_in_metrics,
    finish,
    folder_snapshot,
    real_mnist_present,
    start_layerwise,
    tiny_recipe,
    wait_for,
)

needs_mnist = pytest.mark.skipif(not real_mnist_present(), reason=f"real MNIST not under {SHARED_DATA}")


# --------------------------------------------------------------------------- helpers


def write_recipe(path: Path, epochs: int = 3, train_limit: int = 512, batch_size: int = 64, **train) -> Path:
    """A tiny hybrid network with dropout (so the random generator matters) as a YAML file."""
    data = tiny_recipe(train_limit=train_limit, batch_size=batch_size)
    data["model"]["subnetworks"][1]["blocks"].insert(0, {"name": "drop", "layer": "dropout", "p": 0.2})
    data["train"] = {"epochs": epochs, "device": "cpu", **train}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_folder(runs: Path) -> Path:
    """The one run folder under ``runs``."""
    (folder,) = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink()]
    return folder


# --------------------------------------------------------------------------- subprocesses


def subprocess_env(data_cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LAYERWISE_DATA": str(data_cache), "COLUMNS": "200",
            "PYTHONPATH": str(REPO)}


# Long enough epochs (128 batches) that a kill 0.1 s after epoch 1's checkpoint lands in epoch 2.
SUBPROCESS_RECIPE = {"epochs": 3, "train_limit": 2048, "batch_size": 16}


class ReferenceRun:
    """An uninterrupted subprocess run of the kill tests' recipe, started once and shared."""

    def __init__(self, root: Path, data_cache: Path):
        self.root = root
        self.env = subprocess_env(data_cache)
        self.recipe = write_recipe(root / "tiny.yaml", **SUBPROCESS_RECIPE)
        self.process = start_layerwise("train", str(self.recipe), "--runs-dir", str(root / "runs"), "--no-progress",
                                       env=self.env, cwd=root)
        self._run: Path | None = None

    def run(self) -> Path:
        """The finished run folder (waits for it)."""
        if self._run is None:
            code, _, err = finish(self.process)
            assert code == 0, err
            self._run = run_folder(self.root / "runs")
        return self._run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if not real_mnist_present():
        pytest.skip(f"real MNIST not under {SHARED_DATA}")
    # The same decoded-data cache as conftest's autouse fixture, so MNIST is decoded once.
    ref = ReferenceRun(tmp_path_factory.mktemp("reference"), tmp_path_factory.getbasetemp() / "data-cache")
    yield ref
    if ref.process.poll() is None:
        ref.process.kill()


def resume_in_subprocess(run: Path, reference: ReferenceRun) -> None:
    code, out, err = finish(start_layerwise("train", "--resume", str(run), "--no-progress",
                                            env=reference.env, cwd=reference.root))
    assert code == 0, err
    assert "Traceback" not in err


def signal_in_epoch_2(tmp_path: Path, reference: ReferenceRun, sig: signal.Signals) -> tuple[Path, subprocess.Popen]:
    """Start the reference recipe in a new run folder and send ``sig`` just after epoch 1 is saved."""
    runs = tmp_path / "runs"
    victim = start_layerwise("train", str(reference.recipe), "--runs-dir", str(runs), "--no-progress",
                             env=reference.env, cwd=tmp_path)
    wait_for(runs / "latest" / STATE_FILE, victim)
    time.sleep(0.1)  # into epoch 2
    victim.send_signal(sig)
    return runs, victim


@pytest.mark.integration
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference):
    runs, victim = signal_in_epoch_2(tmp_path, reference, signal.SIGKILL)
    victim.wait()
    run = run_folder(runs)
    assert load_state(run / STATE_FILE).epoch == 1, "the kill must land before epoch 2 is saved"
    assert epochs_in_metrics(run) == [1]

    resume_in_subprocess(run, reference)
    done = reference.run()
    # Weights, every optimizer's moments and step, and the random generator: all bit-identical.
    assert_same_tensors(run / WEIGHTS_FILE, done / WEIGHTS_FILE)
    assert_same_tensors(run / STATE_FILE, done / STATE_FILE)
    assert epochs_in_metrics(run) == [1, 2, 3]
    ours = [json.loads(line)["train_acc"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["train_acc"] for line in (done / "metrics.jsonl").read_text().splitlines()]
    assert ours == theirs
    assert not list(run.glob(".*.tmp")), "a resume removes temporary files that the kill left"


@pytest.mark.integration
def test_sigint_stops_saves_and_prints_the_resume_command(tmp_path, reference):
    runs, victim = signal_in_epoch_2(tmp_path, reference, signal.SIGINT)
    code, _, err = finish(victim)
    run = run_folder(runs)
    assert code == 130, err
    assert "Traceback" not in err
    message = " ".join(err.split())
    assert message.startswith("tiny:") and "interrupted: stopped" in message, message
    assert f"Resume with: layerwise train --resume {run}" in message, message
    saved = load_state(run / STATE_FILE).epoch
    assert saved in (1, 2), saved
    if saved == 1:
        assert "epoch 2 will be redone" in message, message

    resume_in_subprocess(run, reference)
    assert_same_tensors(run / WEIGHTS_FILE, reference.run() / WEIGHTS_FILE)


WRITER = """
import sys, torch
from layerwise.checkpoint import save_checkpoint
from layerwise.factory import network_from_recipe
from layerwise.graph import Network
from layerwise.factory import parse_recipe
from tests.helpers import tiny_recipe

data = tiny_recipe()
data["model"]["subnetworks"][0]["blocks"][0]["out"] = 4096   # about 13 MB of weights
recipe = parse_recipe(data, "writer")
graph = network_from_recipe(recipe, (1, 28, 28), 10)
epoch = 0
while True:
    epoch += 1
    with torch.no_grad():
        for tensor in graph.state_dict().values():
            tensor.fill_(epoch)   # every tensor says which save it belongs to
    save_checkpoint(sys.argv[1], graph, recipe, epoch, {"epoch": epoch})
    print(epoch, flush=True)
"""


def test_kill_during_checkpoint_writes_keeps_the_previous_one(tmp_path):
    """Writers that save a 13 MB checkpoint in a loop are SIGKILLed while a temporary file is
    being written; each time, the checkpoint on disk is one whole earlier version."""
    env = subprocess_env(tmp_path / "data")
    rng = random.Random(0)
    folders = [tmp_path / f"writer{i}" for i in range(3)]
    writers = []
    for folder in folders:
        folder.mkdir()
        writers.append(subprocess.Popen([sys.executable, "-c", WRITER, str(folder / WEIGHTS_FILE)], env=env,
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    torn = 0
    for folder, writer in zip(folders, writers, strict=True):
        try:
            assert writer.stdout.readline().strip() == "1", writer.stderr.read()  # one save has completed
            for _ in range(rng.randint(0, 2)):
                writer.stdout.readline()
            deadline = time.monotonic() + 30
            while not list(folder.glob(".*.tmp")) and time.monotonic() < deadline:
                # The temporary file may live only a few milliseconds, so poll every millisecond:
                # often enough to catch it, yet no longer a busy-wait spinning a core for up to
                # 30 s (under pytest-xdist that core runs another worker's tests, and the writer).
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.004))
        finally:
            writer.kill()
            writer.wait()
        ckpt = load_checkpoint(folder / WEIGHTS_FILE)
        assert ckpt.epoch >= 1
        assert all(bool((t == ckpt.epoch).all()) for t in ckpt.tensors.values()), "a mix of two saves"
        torn += len(list(folder.glob(".*.tmp")))
    assert torn >= 1, "no kill landed during a write; the test did not test anything"


# --------------------------------------------------------------------------- in-process runs


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml")


def train_cli(cli, recipe: Path, runs: Path, *extra: str):
    return cli("train", str(recipe), "--runs-dir", str(runs), "--no-progress", *extra)


def interrupted_run(cli, recipe: Path, runs: Path, monkeypatch, after_epoch: int, *, before_weights: bool) -> Path:
    """A run stopped right after epoch ``after_epoch``'s resume state was written: either before
    ``model.safetensors`` and ``metrics.jsonl`` (as a kill between the writes would) or after."""
    target = "save_state" if before_weights else "save_checkpoint"
    real = getattr(layerwise.train_run, target)

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        if args[4 if before_weights else 3] == after_epoch:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(layerwise.train_run, target, save_then_stop)
        result = train_cli(cli, recipe, runs)
    assert result.code == 130, result.err
    return run_folder(runs)


@pytest.mark.integration
@needs_mnist
@pytest.mark.parametrize("before_weights", [True, False], ids=["between-state-and-weights", "after-weights"])
def test_a_stop_between_writes_never_mixes_epochs(cli, recipe_file, tmp_path, monkeypatch, before_weights):
    reference = train_cli(cli, recipe_file, tmp_path / "reference")
    assert reference.code == 0, reference.err
    run = interrupted_run(cli, recipe_file, tmp_path / "runs", monkeypatch, 2, before_weights=before_weights)
    assert load_state(run / STATE_FILE).epoch == 2
    assert load_checkpoint(run).epoch == (1 if before_weights else 2)

    resumed = cli("train", "--resume", str(run), "--no-progress")
    assert resumed.code == 0, resumed.err
    assert epochs_in_metrics(run) == [1, 2, 3]
    assert_same_tensors(run / WEIGHTS_FILE, run_folder(tmp_path / "reference") / WEIGHTS_FILE)


@pytest.mark.integration
@needs_mnist
def test_resume_without_a_path_uses_latest_and_a_finished_run_has_nothing_to_do(cli, recipe_file, tmp_path,
                                                                               monkeypatch):
    runs = tmp_path / "runs"
    run = interrupted_run(cli, recipe_file, runs, monkeypatch, 1, before_weights=False)
    resumed = cli("train", "--resume", "--runs-dir", str(runs), "--no-progress")
    assert resumed.code == 0, resumed.err
    assert epochs_in_metrics(run) == [1, 2, 3]
    again = cli("train", "--resume", "--runs-dir", str(runs), "--no-progress")
    assert again.code == 0 and "nothing to resume" in " ".join(again.err.split())


@pytest.mark.integration
@needs_mnist
def test_a_run_stopped_before_its_first_epoch_restarts_in_place(cli, recipe_file, tmp_path):
    reference = train_cli(cli, recipe_file, tmp_path / "reference")
    assert reference.code == 0
    run = tmp_path / "runs" / "tiny-19700101-000000"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text((run_folder(tmp_path / "reference") / "recipe.yaml").read_text())
    resumed = cli("train", "--resume", str(run), "--no-progress")
    assert resumed.code == 0, resumed.err
    assert "from epoch 1" in " ".join(resumed.err.split())
    assert_same_tensors(run / WEIGHTS_FILE, run_folder(tmp_path / "reference") / WEIGHTS_FILE)


def test_resume_refuses_overrides_and_non_runs(cli, tmp_path):
    assert_one_line_error(cli("train", "--resume", str(tmp_path), "train.epochs=5"),
                          "--resume takes no overrides", "train.epochs=5")
    assert_one_line_error(cli("train", "--resume", str(tmp_path)), "not a run folder")
    assert_one_line_error(cli("train", "--resume", "--runs-dir", str(tmp_path)), "latest does not exist")
    assert_one_line_error(cli("train"), "give a recipe", "--resume")


@pytest.mark.integration
@needs_mnist
@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "not a readable resume state (truncated or corrupt?)"),
    (lambda data: data[:-100] + bytes(b ^ 0xFF for b in data[-100:]), "do not match the checksum"),
    (lambda data: b"", "not a readable resume state"),
], ids=["truncated", "flipped-bytes", "empty"])
def test_a_corrupt_state_file_is_a_clear_error(cli, recipe_file, tmp_path, monkeypatch, damage, message):
    run = interrupted_run(cli, recipe_file, tmp_path / "runs", monkeypatch, 1, before_weights=False)
    state = run / STATE_FILE
    state.write_bytes(damage(state.read_bytes()))
    assert_one_line_error(cli("train", "--resume", str(run), "--no-progress"), str(state), message)


@pytest.mark.integration
@needs_mnist
def test_a_state_from_another_recipe_is_refused(cli, recipe_file, tmp_path, monkeypatch):
    run = interrupted_run(cli, recipe_file, tmp_path / "runs", monkeypatch, 1, before_weights=False)
    wider = tmp_path / "wider.yaml"
    data = yaml.safe_load(recipe_file.read_text())
    data["model"]["subnetworks"][0]["blocks"][0]["out"] = 48
    wider.write_text(yaml.safe_dump(data))
    other = interrupted_run(cli, wider, tmp_path / "other", monkeypatch, 1, before_weights=False)
    (run / STATE_FILE).write_bytes((other / STATE_FILE).read_bytes())
    assert_one_line_error(cli("train", "--resume", str(run), "--no-progress"), "was saved for another recipe",
                          "model.subnetworks[0].blocks[0].out")


@pytest.mark.integration
@needs_mnist
def test_nan_from_a_tiny_sigma_names_block_objective_and_cause(cli, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml")
    result = train_cli(cli, recipe, tmp_path / "runs", "model.subnetworks.sn1.blocks.hsic1.objective.sigma=1e-30")
    text = assert_one_line_error(result, "epoch 1, batch 1:", "block 'hsic1' (objective nhsic) became nan",
                                 "likely cause: sigma 1e-30 too small", "No epoch had completed")
    assert "typical sigma is about 5" in text  # a sigma this small is the cause, not a learning rate


@pytest.mark.integration
@needs_mnist
def test_nan_after_a_good_epoch_keeps_that_checkpoint(cli, recipe_file, tmp_path, monkeypatch):
    """Epoch 1 trains normally; then sigma collapses to 1e-30 and the label kernel turns NaN."""
    real = layerwise.train_run.save_checkpoint

    def save_then_shrink_sigma(path, graph, recipe, epoch, metrics):
        real(path, graph, recipe, epoch, metrics)
        graph.blocks["hsic1"].objective.config.sigma = 1e-30

    monkeypatch.setattr(layerwise.train_run, "save_checkpoint", save_then_shrink_sigma)
    result = train_cli(cli, recipe_file, tmp_path / "runs")
    run = run_folder(tmp_path / "runs")
    assert_one_line_error(result, "epoch 2, batch 1:", "hsic1", "sigma 1e-30",
                          f"The last good checkpoint (epoch 1) is kept in {run}", "train.on_nonfinite=skip")
    assert load_checkpoint(run).epoch == 1 and load_state(run / STATE_FILE).epoch == 1
    assert epochs_in_metrics(run) == [1]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(run).tensors.values())


@pytest.mark.integration
@needs_mnist
def test_full_disk_keeps_the_last_epoch_and_resume_finishes(cli, recipe_file, tmp_path, monkeypatch):
    reference = train_cli(cli, recipe_file, tmp_path / "reference")
    assert reference.code == 0
    real_save_state, real_fsync = layerwise.train_run.save_state, os.fsync
    disk = {"full": False}

    def fsync(fd):  # the atomic writer's fsync is where a full disk shows up
        if disk["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    def disk_full_from_epoch_2(path, graph, optimizers, recipe, epoch, record, generators):
        disk["full"] = epoch >= 2
        real_save_state(path, graph, optimizers, recipe, epoch, record, generators)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        patch.setattr(layerwise.train_run, "save_state", disk_full_from_epoch_2)
        result = train_cli(cli, recipe_file, tmp_path / "runs")
    run = run_folder(tmp_path / "runs")
    assert_one_line_error(result, f"cannot write {run / STATE_FILE}: No space left on device",
                          "the previous version is untouched", "The last complete epoch (1) is kept",
                          f"layerwise train --resume {run}")
    assert load_state(run / STATE_FILE).epoch == 1 and load_checkpoint(run).epoch == 1
    assert not list(run.glob(".*.tmp")), "the failed write removed its temporary file"

    resumed = cli("train", "--resume", str(run), "--no-progress")  # space freed
    assert resumed.code == 0, resumed.err
    assert_same_tensors(run / WEIGHTS_FILE, run_folder(tmp_path / "reference") / WEIGHTS_FILE)


@pytest.mark.integration
@needs_mnist
def test_read_only_run_folder_is_one_line_and_changes_nothing(cli, recipe_file, tmp_path, monkeypatch):
    run = interrupted_run(cli, recipe_file, tmp_path / "runs", monkeypatch, 1, before_weights=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # Tests often run as root, whom chmod does not stop; a read-only mount fails like this.
    with monkeypatch.context() as patch:
        patch.setattr("tempfile.mkstemp", read_only)
        result = cli("train", "--resume", str(run), "--no-progress")
    assert_one_line_error(result, f"{run}: cannot write in this run folder (Read-only file system)")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.integration
@needs_mnist
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_chmod_read_only_run_folder(cli, recipe_file, tmp_path, monkeypatch):
    run = interrupted_run(cli, recipe_file, tmp_path / "runs", monkeypatch, 1, before_weights=False)
    run.chmod(0o555)
    try:
        assert_one_line_error(cli("train", "--resume", str(run), "--no-progress"), "cannot write in this run folder")
    finally:
        run.chmod(0o755)


# --------------------------------------------------------------------------- non-finite values (no data needed)


def tiny_trainer(check_every: int | None = None, **train):
    from layerwise.factory import network_from_recipe, parse_recipe
    from layerwise.trainer import Trainer

    data = tiny_recipe()
    data["train"].update(train)
    recipe = parse_recipe(data, "tiny")
    torch.manual_seed(0)
    graph = network_from_recipe(recipe, (1, 28, 28), 10)
    return Trainer.from_recipe(graph, recipe, nonfinite_check_every=check_every)


def random_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 1, 28, 28, generator=generator), torch.randint(0, 10, (32,), generator=generator), None)
            for _ in range(count)]


def nan_on_batches(trainer, block: str, bad: set[int]) -> None:
    """Make ``block``'s objective return a NaN loss on the given (1-based) batches."""
    objective = trainer.graph.blocks[block].objective
    real, calls = objective.loss, [0]

    def loss(z, ctx):
        calls[0] += 1
        value, metrics = real(z, ctx)
        if calls[0] in bad:
            value = value * float("nan")
            metrics = {**metrics, "loss": value.detach()}
        return value, metrics

    objective.loss = loss


def snapshot(trainer) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in trainer.graph.state_dict().items()}


def test_stop_names_the_first_bad_batch_block_and_cause():
    from layerwise.errors import NonFiniteError

    trainer = tiny_trainer()
    nan_on_batches(trainer, "hsic1", {2})
    # The NaN is injected into the loss while its terms stay finite: the loss's weighting is blamed.
    with pytest.raises(NonFiniteError, match=r"epoch 1, batch 2: loss of block 'hsic1' \(objective nhsic\) became nan; "
                                             r"likely cause: its logged terms are finite"):
        trainer.train_epoch(random_batches(4), epoch=1)


def test_skip_leaves_weights_and_optimizers_untouched_and_counts_the_batch():
    trainer = tiny_trainer(on_nonfinite="skip")
    nan_on_batches(trainer, "hsic1", {2})
    batches = random_batches(3)
    trainer.watch.start_epoch(1)
    trainer.step(*batches[0][:2])
    before = snapshot(trainer)
    steps = {name: [s["step"].clone() for s in opt.state.values()] for name, opt in trainer.optimizers().items()}
    assert trainer.step(*batches[1][:2]).skipped
    after = snapshot(trainer)
    assert all(torch.equal(before[name], after[name]) for name in before), "a skipped batch changes no weight"
    assert steps == {name: [s["step"] for s in opt.state.values()] for name, opt in trainer.optimizers().items()}

    trainer = tiny_trainer(on_nonfinite="skip")
    nan_on_batches(trainer, "hsic1", {2})
    summary = trainer.train_epoch(random_batches(3), epoch=1)
    assert summary["skipped_batches"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["blocks"]["hsic1"].values())


def test_skip_stops_when_every_batch_is_bad():
    from layerwise.errors import NonFiniteError

    trainer = tiny_trainer(on_nonfinite="skip")
    nan_on_batches(trainer, "hsic1", {1, 2, 3})
    with pytest.raises(NonFiniteError, match="every one of the 3 batches"):
        trainer.train_epoch(random_batches(3), epoch=1)


def test_deferred_check_reports_the_first_bad_batch_later():
    """The GPU mode, exercised on the CPU: the flag is read every 4 batches, the culprit is batch 2."""
    from layerwise.errors import NonFiniteError

    trainer = tiny_trainer(check_every=4)
    # cka: no Cholesky, whose own check on the next (NaN) batch would report it at batch 3 already.
    trainer.graph.blocks["hsic1"].objective.config.normalization = "cka"
    nan_on_batches(trainer, "hsic1", {2})
    seen = []
    with pytest.raises(NonFiniteError, match=r"batch 2: loss of block 'hsic1'"):
        trainer.train_epoch(random_batches(6), on_batch=lambda: seen.append(1), epoch=1)
    assert len(seen) == 3, "raised at the 4th batch's check, before its progress tick"


def test_watch_reads_the_device_rarely_only_on_a_gpu_in_stop_mode():
    from layerwise.nonfinite import GPU_CHECK_EVERY, NonFiniteWatch

    def explain(key):
        return "", ""

    assert NonFiniteWatch("stop", torch.device("cpu"), explain).check_every == 1
    assert NonFiniteWatch("stop", torch.device("cuda"), explain).check_every == GPU_CHECK_EVERY
    assert NonFiniteWatch("skip", torch.device("cuda"), explain).check_every == 1


def test_a_blown_up_backprop_block_is_blamed_on_the_global_learning_rate():
    from layerwise.errors import NonFiniteError

    trainer = tiny_trainer()
    with torch.no_grad():
        trainer.graph.blocks["bp1"].body[0].weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"the output of block 'bp1' \(objective none\) became (nan|inf); "
                                             r"likely cause: a learning rate too high .*optim\.global\.lr"):
        trainer.train_epoch(random_batches(1), epoch=1)


@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_tiny_sigma_is_a_named_error_in_both_normalisations(normalization):
    """cca's Cholesky raises on the NaN kernel, cka returns NaN: both end in the same message."""
    from layerwise.errors import NonFiniteError
    from layerwise.factory import network_from_recipe, parse_recipe
    from layerwise.trainer import Trainer

    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0]["objective"].update(sigma=1e-30, normalization=normalization)
    recipe = parse_recipe(data, "tiny")
    trainer = Trainer.from_recipe(network_from_recipe(recipe, (1, 28, 28), 10), recipe)
    with pytest.raises(NonFiniteError, match=r"batch 1: .*block 'hsic1' \(objective nhsic\) became nan; "
                                             r"likely cause: sigma 1e-30 too small"):
        trainer.train_epoch(random_batches(1), epoch=1)


# --------------------------------------------------------------------------- safety


PACKAGE = REPO / "layerwise"
UNSAFE = {
    "a pickle-based module": r"\b(c?[Pp]ickle|dill|cloudpickle|marshal|shelve|joblib)\b",
    "yaml.load and its unsafe kin": r"\byaml\.(load|load_all|full_load|full_load_all|unsafe_load|unsafe_load_all)\s*\(",
    "eval(": r"(?<![\w.])eval\s*\(",
    "exec(": r"(?<![\w.])exec\s*\(",
    "__import__(": r"\b__import__\s*\(",
    "import_module (importing by a name that could come from a recipe)": r"\bimport_module\b",
    "numpy's pickle loading": r"allow_pickle\s*=\s*True",
}


def package_sources() -> list[tuple[Path, str]]:
    return [(path, path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))]


@pytest.mark.parametrize("what", sorted(UNSAFE))
def test_the_package_never_loads_unsafely(what):
    import re

    hits = [f"{path.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}"
            for path, text in package_sources() for m in re.finditer(UNSAFE[what], text)]
    assert not hits, f"{what} in {hits}"


def test_every_torch_load_is_weights_only():
    import re

    for path, text in package_sources():
        for match in re.finditer(r"\btorch\.load\s*\(", text):
            call = text[match.end():text.index(")", match.end())]
            assert "weights_only=True" in call, f"{path.relative_to(REPO)}: torch.load({call}) may unpickle code"


@pytest.mark.parametrize("key, value", [
    ("layer", "os.system"), ("layer", "torch.nn.Linear"), ("act", "builtins.eval"),
    ("objective", "subprocess.Popen"), ("objective", {"name": "layerwise.objectives.nhsic.NHSIC"}),
])
def test_recipes_name_registered_components_only(cli, tmp_path, key, value):
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0][key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert_one_line_error(cli("validate", str(path)), "model.subnetworks[0].blocks[0]", "unknown")


def test_python_tags_in_yaml_are_refused_without_running_anything(cli, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert_one_line_error(cli("validate", str(path)), "not valid YAML", "python/object/apply:os.system")
    override = cli("validate", "mnist_hybrid", f"name=!!python/object/apply:os.system ['touch {marker}']")
    assert_one_line_error(override, "name: expected 1 to 100 characters")
    assert not marker.exists()


def test_a_recipe_name_cannot_steer_the_run_folder_elsewhere(cli):
    assert_one_line_error(cli("validate", "mnist_hybrid", "name=../../escaped"), "name: expected 1 to 100 characters")


def test_an_unreadable_recipe_is_one_line(cli, tmp_path, monkeypatch):
    path = write_recipe(tmp_path / "locked.yaml")
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == path:  # chmod 000 does not stop root, so refuse the read here
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert_one_line_error(cli("validate", str(path)), f"{path}: cannot read the recipe (Permission denied)")


@pytest.mark.integration
@needs_mnist
def test_a_damaged_metrics_log_is_named_on_resume(cli, recipe_file, tmp_path, monkeypatch):
    run = interrupted_run(cli, recipe_file, tmp_path / "runs", monkeypatch, 2, before_weights=False)
    first = (run / "metrics.jsonl").read_text().splitlines()[0]  # epoch 1's whole record
    (run / "metrics.jsonl").write_text(first + '\n{"epo\n')
    before = folder_snapshot(run)
    assert_one_line_error(cli("train", "--resume", str(run), "--no-progress"),
                          f"{run / 'metrics.jsonl'}: line 2 is not an epoch record")
    assert folder_snapshot(run) == before  # refused before the lock's pid or any file changed
