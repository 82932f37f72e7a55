"""Data-parallel training (layerwise.distributed): N processes compute what one process computes.

- the gather's gradient logic, in float64, through the real trainer: two torchrun ranks, each on
  half a batch, end with exactly the gradients of one process on the whole batch;
- end to end on real MNIST: `layerwise train R --nproc 2` (torchrun, gloo) against one process,
  same final weights within float tolerance, one run folder;
- the CLI: what --nproc launches, and the errors it gives before launching.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

from layerwise import distributed
from layerwise.distributed import Group
from tests.helpers import (
    INPUT_SHAPE,
    REPO,
    assert_same_tensors,
    epochs_in_metrics,
    float64_batch,
    float64_trainer,
    folder_snapshot,
    gradients,
    make_finished_run,
    process_tree,
    start_layerwise,
    tiny_recipe,
    wait_for,
)

# Run by torchrun in each rank: its half of the batch, the real trainer, its gradients to a file.
RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from layerwise.distributed import Group
from tests.helpers import float64_batch, float64_trainer, gradients

dist.init_process_group("gloo")
group = Group(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
graph, trainer = float64_trainer(group)
x, y = (t.tensor_split(group.world)[group.rank] for t in float64_batch())
result = trainer.compute_gradients(x, y)
torch.save({"grads": gradients(graph), "global_loss": result.global_loss, "metrics": result.block_metrics,
            "buffers": dict(graph.named_buffers())}, f"{sys.argv[1]}/rank{group.rank}.pt")
dist.destroy_process_group()
"""


def subprocess_env() -> dict[str, str]:
    """One thread per process (two share these cores), and the repository importable as `tests`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def test_two_ranks_compute_the_gradients_of_one_process(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    graph, trainer = float64_trainer()
    result = trainer.compute_gradients(*float64_batch())
    expected = gradients(graph)
    assert len(expected) == sum(1 for p in graph.parameters() if p.requires_grad)
    scale = max(float(g.abs().max()) for g in expected.values())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            # float64 rounding, amplified by the cca blocks behind the batch-norm (its all-reduced
            # mean rounds differently from one process's) to a few 1e-13 of the gradient's size;
            # the biases just before a batch-norm have a zero true gradient, so rounding is all of it
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-9, atol=1e-10 * scale, msg=name)
        torch.testing.assert_close(got["global_loss"], result.global_loss, rtol=1e-12, atol=0)
        for block, metrics in result.block_metrics.items():  # local metrics: of the global batch too
            for key, value in metrics.items():
                torch.testing.assert_close(got["metrics"][block][key], value, rtol=1e-10, atol=1e-12)
        # batch-norm over the global batch: the running statistics of one process, on every rank
        buffers = dict(graph.named_buffers())
        assert any(name.endswith("running_var") for name in buffers)
        for name, buffer in buffers.items():
            torch.testing.assert_close(got["buffers"][name], buffer, rtol=1e-10, atol=1e-12, msg=name)


@pytest.fixture
def group_of_one():
    """A real gloo process group of one rank, in this process."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield Group(0, 1, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_keeps_this_ranks_slice(group_of_one):
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    gathered = group_of_one.gather_with_grad(z)
    assert torch.equal(gathered, z)
    weights = torch.randn(4, 3, dtype=torch.float64)
    (gathered * weights).sum().backward()
    assert torch.equal(z.grad, weights)
    # the backward of rank r of N is the r-th block of rows of the incoming gradient, nothing else
    ctx = type("Ctx", (), {"rank": 1, "rows": 2})()
    incoming = torch.arange(12.0).reshape(6, 2)
    slice_, *_ = distributed.GatherWithGrad.backward(ctx, incoming)
    assert torch.equal(slice_, incoming[2:4])


def test_a_group_of_one_trains_like_no_group(group_of_one):
    graph, trainer = float64_trainer()
    trainer.compute_gradients(*float64_batch())
    alone = gradients(graph)
    graph, trainer = float64_trainer(group_of_one)
    trainer.compute_gradients(*float64_batch())
    for name, grad in gradients(graph).items():
        torch.testing.assert_close(grad, alone[name], rtol=1e-12, atol=1e-14, msg=name)


def test_global_batch_norm_keeps_the_checkpoint_layout():
    graph, _ = float64_trainer()
    before = {name: t.clone() for name, t in graph.state_dict().items()}
    distributed.use_global_batch_norm(graph)
    assert any(isinstance(m, distributed.GlobalBatchNorm) for m in graph.modules())
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) for m in graph.modules())
    after = graph.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    # without a process group it is plain batch-norm
    x = torch.randn(6, *INPUT_SHAPE, dtype=torch.float64)
    assert torch.isfinite(graph(x)).all()


def test_shards_of_a_stream_make_up_its_batches():
    from layerwise import data
    from layerwise.plugins import registries

    spec = registries().datasets.get("mnist")
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    options = dict(batch_size=8, shuffle=True, seed=3, noise=0.3, noise_seed=5, drop_last=True)
    whole = data.BatchStream(spec, images, labels, **options)
    shards = [data.BatchStream(spec, images, labels, shard=(rank, 4), **options) for rank in range(4)]
    for stream in (whole, *shards):
        stream.set_epoch(2)
    for (x, y, idx), *parts in zip(whole, *shards, strict=True):
        assert [len(part[1]) for part in parts] == [2, 2, 2, 2]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)  # same samples and the same noise
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[2] for p in parts]), idx)
    with pytest.raises(ValueError, match="shard"):
        data.BatchStream(spec, images, labels, batch_size=8, shuffle=False, seed=0, shard=(4, 4))


# --------------------------------------------------------------------------- end to end on MNIST


def write_recipe(folder) -> str:
    """The tiny hybrid recipe (nhsic then backprop blocks, no batch-norm), trained with SGD: unlike
    Adam, SGD's step is proportional to the gradient, so a wrongly scaled gradient would show.

    The nhsic ridge is eps 1e-3, not the papers' 1e-5: at batch 64 that ridge (6.4e-4) makes
    the local gradient so ill-conditioned that float32 rounding differences grow about tenfold
    per step (docs/distributed.md), and the comparison would measure chaos, not correctness."""
    recipe = tiny_recipe(train_limit=512)
    recipe["model"]["subnetworks"][0]["blocks"][0]["objective"]["eps"] = 1e-3
    recipe["train"]["epochs"] = 2
    recipe["optim"] = {"local": {"name": "sgd", "lr": 1e-4}, "global": {"name": "sgd", "lr": 0.1}}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.integration
def test_nproc_2_trains_the_model_of_one_process(tmp_path, cli, mnist_available):
    recipe = write_recipe(tmp_path)
    single = cli("train", recipe, "--runs-dir", str(tmp_path / "single"), "--no-progress")
    assert single.code == 0, single.err
    work = tmp_path / "work"  # the launch's working directory: only runs/ may appear in it
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "layerwise", "train", recipe, "--nproc", "2",
                           "--runs-dir", "runs", "--no-progress"],
                          cwd=work, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 2 processes" in done.stderr
    assert done.stdout.count("Run folder:") == 1, "only rank 0 prints"

    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    folders = [p for p in (work / "runs").iterdir() if p.name != "latest"]
    assert len(folders) == 1, "only rank 0 creates a run folder"
    multi_run, single_run = folders[0], (tmp_path / "single" / "latest").resolve()

    multi, one = load_file(multi_run / "model.safetensors"), load_file(single_run / "model.safetensors")
    assert multi.keys() == one.keys()
    for name in one:
        # Measured: at most 3e-8 apart (weights up to 0.64) after 16 steps: float32 rounding.
        torch.testing.assert_close(multi[name], one[name], rtol=1e-5, atol=1e-6, msg=name)

    def records(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    for got, expected in zip(records(multi_run), records(single_run), strict=True):
        assert got["train_acc"] == expected["train_acc"]  # counts every rank's samples
        assert got["global_loss"] == pytest.approx(expected["global_loss"], rel=1e-6)
        assert got["blocks"]["hsic1"]["hsic_zy"] == pytest.approx(expected["blocks"]["hsic1"]["hsic_zy"], rel=1e-6)
        assert got["test_acc"] == expected["test_acc"]


# --------------------------------------------------------------------------- the CLI


class FakePopen:
    """Records the command --nproc would launch, and exits with code 7."""

    commands: list[list[str]] = []

    def __init__(self, command, **kwargs):
        FakePopen.commands.append(command)

    def wait(self):
        return 7


def test_nproc_launches_torchrun_with_the_same_arguments(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(distributed.subprocess, "Popen", FakePopen)
    FakePopen.commands.clear()
    recipe = write_recipe(tmp_path)
    result = cli("train", recipe, "train.epochs=1", "--nproc", "2", "--runs-dir", "r", "--data-root", "d",
                 "--no-progress")
    assert result.code == 7, "the exit code is torchrun's"
    # torchrun's own run(), wrapped to report a failed worker in one line (layerwise.distributed.torchrun_main)
    assert FakePopen.commands == [[sys.executable, "-m", "layerwise.distributed", "--standalone",
                                   "--nproc_per_node", "2", "-m", "layerwise", "train", recipe, "train.epochs=1",
                                   "--runs-dir", "r", "--data-root", "d", "--no-progress"]]


def test_nproc_refuses_a_batch_that_does_not_split(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(distributed.subprocess, "Popen", FakePopen)
    FakePopen.commands.clear()
    result = cli("train", write_recipe(tmp_path), "data.batch_size=63", "--nproc", "2")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "error: data.batch_size 63 does not split evenly over 2 processes; choose a batch size that is a "
        "multiple of 2"]
    assert FakePopen.commands == [], "nothing is launched"


def test_resume_with_nproc_launches_torchrun_on_the_resolved_run(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(distributed.subprocess, "Popen", FakePopen)
    FakePopen.commands.clear()
    run = tmp_path / "runs" / "tiny-1"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(open(write_recipe(tmp_path)).read())
    (tmp_path / "runs" / "latest").symlink_to("tiny-1")
    result = cli("train", "--resume", "--nproc", "2", "--runs-dir", str(tmp_path / "runs"))
    assert result.code == 7
    # runs/latest is resolved before the launch, so every worker continues the same run
    assert FakePopen.commands == [[sys.executable, "-m", "layerwise.distributed", "--standalone",
                                   "--nproc_per_node", "2", "-m", "layerwise", "train", str(run), "--resume",
                                   "--runs-dir", str(tmp_path / "runs")]]


def test_resume_with_nproc_checks_the_folder_before_launching(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(distributed.subprocess, "Popen", FakePopen)
    FakePopen.commands.clear()
    result = cli("train", "--resume", str(tmp_path), "--nproc", "2")
    assert result.code == 2
    assert f"{tmp_path}: not a run folder (it has no recipe.yaml)" in result.err
    assert FakePopen.commands == []


@pytest.mark.parametrize("processes", [["--nproc", "2"], ["--stages", "2"]])
def test_resume_with_nproc_refuses_a_crafted_metrics_line_before_launching(tmp_path, cli, monkeypatch, processes):
    """As in one process: one line naming the file, the line and the key, and the folder unchanged;
    before, the workers were launched and rank 0 refused it."""
    monkeypatch.setattr(distributed.subprocess, "Popen", FakePopen)
    FakePopen.commands.clear()
    run = make_finished_run(tmp_path / "runs" / "tiny-20260101-000000", epochs=2)
    log = run / "metrics.jsonl"
    log.write_text(json.dumps({"epoch": 0}) + "\n")  # the state is at epoch 2: the log's line 1 is read
    before = folder_snapshot(run)
    result = cli("train", "--resume", str(run), *processes, "--no-progress")
    assert result.code == 2, result.err
    assert result.err.strip().splitlines() == [
        f"error: {log}: line 1: epoch: expected an epoch number of 1 or more, found 0; fix that line, or delete it "
        f"and the lines after it"]
    assert FakePopen.commands == [], "nothing is launched"
    assert folder_snapshot(run) == before


def test_resume_refuses_overrides_with_nproc_too(tmp_path, cli):
    result = cli("train", "--resume", str(tmp_path), "train.epochs=3", "--nproc", "2")
    assert result.code == 2
    assert "--resume takes no overrides (found train.epochs=3)" in result.err


# --------------------------------------------------------------------------- resume in several processes


def dropout_recipe(folder) -> str:
    """The tiny recipe with dropout, so each rank's random generator matters, and epochs of 64
    two-process steps: long enough that a kill shortly after epoch 1 is saved lands in epoch 2."""
    recipe = tiny_recipe(train_limit=4096)
    recipe["model"]["subnetworks"][0]["blocks"].append({"name": "drop", "layer": "dropout", "p": 0.3})
    recipe["train"]["epochs"] = 3
    path = folder / "dropout.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def train_in_2(*args: str, cwd) -> subprocess.Popen:
    """``layerwise train ARGS --nproc 2`` in the background."""
    return start_layerwise("train", *args, "--nproc", "2", "--no-progress", env=subprocess_env(), cwd=cwd)


def torchrun_2(*args: str, cwd) -> subprocess.Popen:
    """The workers ``layerwise train ARGS --nproc 2`` starts, under torchrun without the process that
    launches them (for the reference run: one Python and torch start-up fewer)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "layerwise", "train", *args, "--no-progress"], env=subprocess_env(), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants as at one instant: frozen first, so none runs on."""
    tree = process_tree(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for member in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, sig)


@pytest.mark.integration
def test_sigkill_then_resume_in_2_processes_is_bit_identical(tmp_path, cli, mnist_available):
    from layerwise.resume import STATE_FILE, load_state

    recipe = dropout_recipe(tmp_path)
    reference = torchrun_2(recipe, "--runs-dir", "reference", cwd=tmp_path)
    _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err[-3000:]
    done = (tmp_path / "reference" / "latest").resolve()

    victim = train_in_2(recipe, "--runs-dir", "runs", cwd=tmp_path)
    wait_for(tmp_path / "runs" / "latest" / STATE_FILE, victim, timeout=120)
    time.sleep(0.2)  # into epoch 2
    kill_tree(victim.pid)  # the launcher, torchrun and both workers
    victim.wait()
    run = (tmp_path / "runs" / "latest").resolve()
    assert load_state(run / STATE_FILE).epoch == 1, "the kill must land before epoch 2 is saved"
    assert load_state(run / STATE_FILE).processes == 2
    elsewhere = tmp_path / "copy" / run.name
    shutil.copytree(run, elsewhere)

    resumed = train_in_2("--resume", str(run), cwd=tmp_path)
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming {run} after epoch 1 of 3 in 2 processes" in " ".join(err.split())
    # Weights, optimizer moments and both ranks' generators: all bit-identical to the uninterrupted run.
    assert_same_tensors(run / "model.safetensors", done / "model.safetensors")
    assert_same_tensors(run / STATE_FILE, done / STATE_FILE)
    assert epochs_in_metrics(run) == [1, 2, 3]

    # The same state continues in one process too (here, in this one): correct, though not bit-identical.
    alone = cli("train", "--resume", str(elsewhere), "--no-progress")
    assert alone.code == 0, alone.err[-3000:]
    assert "it was saved by 2 process(es)" in " ".join(alone.err.split())
    assert epochs_in_metrics(elsewhere) == [1, 2, 3]
    assert load_state(elsewhere / STATE_FILE).processes == 1
