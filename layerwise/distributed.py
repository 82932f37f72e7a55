"""Data-parallel training over several processes, on PyTorch's own engine (``torch.distributed``).

Launch with ``torchrun --nproc_per_node=N -m layerwise train R.yaml`` or, the same thing,
``layerwise train R.yaml --nproc N``. Each process (a *rank*) trains on a contiguous share of
every global batch; the result is the model one process would train on the same global batches,
up to the order of floating-point sums. docs/distributed.md is the user's guide.

Why the local objectives need care. Cross-entropy is a mean over samples, so ranks can each take
the mean over their share and average the gradients. nHSIC is not: its Gram matrices couple every
pair of samples in the batch, and the nHSIC of N sub-batches is a different objective from the
nHSIC of their union. So the kernels are built over the **gathered global batch**: the trainer
gathers the inputs and labels (``ctx.x``, ``ctx.y``) and, for each local block, its output
``Z_all = gather_with_grad(z)``, and every rank computes the same loss ``L(Z_all)`` on the same
tensors.

Why the gather's backward is a slice with no communication. Every rank holds an identical copy of
``L`` and of ``Z_all``, so every rank's ``dL/dZ_all`` is the same. The loss depends on rank ``r``'s
parameters only through ``z_r``, its slice of ``Z_all``, so the true gradient is
``dL/dθ = sum_r dL/dz_r · dz_r/dθ``. Rank ``r`` can compute exactly its term: take its own slice
of ``dL/dZ_all`` (:class:`GatherWithGrad`) and backpropagate it through its own forward pass.
One ``all_reduce(SUM)`` of the parameter gradients then adds the terms, giving every rank
``dL/dθ``. (The usual all-gather backward, a reduce-scatter of the gradients, would instead add
N identical copies of ``dL/dZ_all``: right for a loss that is a sum over ranks, N times too large
for a loss every rank computes whole. It would also need reduce-scatter, which gloo lacks.)

Parameters that act *after* the gather are the exception: an objective's own modules (such as an
auxiliary classifier) see the whole ``Z_all`` on every rank, so every rank already holds their
whole gradient; the trainer averages those instead of summing them.

The global cross-entropy: each rank takes ``cross_entropy(logits, y, reduction="sum") / B`` over
its share, with ``B`` the global batch size, and the same ``all_reduce(SUM)`` turns the sum of
those gradients into the gradient of the mean over the global batch. One flat all-reduce per
step carries every trainable gradient (local and global), the global loss and the values the
non-finite watch reads, so every rank steps, or skips, identically.

Batch-norm normalises over the global batch too: :func:`use_global_batch_norm` swaps every
batch-norm layer for a :class:`GlobalBatchNorm`, whose mean and variance are all-reduced sums
(:class:`AllReduceSum`, whose backward all-reduces the gradient as well), so N processes compute
the statistics, the outputs, the gradients and the running averages of one process. (PyTorch's
``SyncBatchNorm`` would do this on GPUs only.)

What is *not* shared: the kernel work is replicated, since every rank builds the same ``m x m``
Gram matrices of the global batch. Data parallelism divides the network's forward and backward
and the data preparation, not the nHSIC kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerwise.errors import LayerwiseError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Set by ``torchrun`` (``torch.distributed.run``) in every process it starts."""

STOP_CHECK_EVERY = 10
"""Batches between the ranks' votes on Ctrl-C (each vote is a collective and a host sync)."""

TIMEOUT_ENV = "LAYERWISE_DIST_TIMEOUT"
"""Seconds a collective waits for the other processes before failing (see :func:`collective_timeout`)."""

DEFAULT_TIMEOUT_SECONDS = 300
"""gloo's own default is 30 minutes: a stopped or hung process would block the others that long.
Five minutes is far more than any step or any epoch-end evaluation of the shipped recipes (rank 0
evaluates and saves while the others wait in a collective), and short enough to notice."""

LAUNCHER_PID_ENV = "LAYERWISE_LAUNCHER_PID"
"""Set by :func:`launch` for torchrun, and by torchrun's wrapper for its workers: their parent's pid."""

STAGES_ENV = "LAYERWISE_STAGES"
"""Set by :func:`launch` for the workers: the pipeline's stage count (1: no pipeline)."""

REPORT_ENV = "LAYERWISE_LAUNCH_REPORT"
"""Where torchrun's wrapper writes which rank failed first, for :func:`launch` to say it in one line."""

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started this one among (1 when not launched by it)."""
    if not all(name in os.environ for name in LAUNCH_VARIABLES):
        return 1
    return int(os.environ["WORLD_SIZE"])


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: ``$LAYERWISE_DIST_TIMEOUT`` seconds, else
    :data:`DEFAULT_TIMEOUT_SECONDS`. Raise :class:`LayerwiseError` for a value that is not a number > 0."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_SECONDS)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise LayerwiseError(f"{TIMEOUT_ENV}: expected a number of seconds > 0, found {text!r}")
    return datetime.timedelta(seconds=seconds)


def die_with_parent(sig: int | None = None, expected_parent: int | None = None) -> str:
    """Have this process receive ``sig`` (default SIGKILL) when its parent dies; return how (``prctl`` or
    ``watchdog``).

    torchrun starts its workers in sessions of their own, so a SIGKILL of torchrun (which cannot
    pass anything on) would leave them training, unseen, to the end. On Linux the kernel delivers
    ``sig`` at the parent's death (``prctl(PR_SET_PDEATHSIG)``): at once, at no cost, and even while
    the process is blocked in a collective, where a Python thread might not get to run. Elsewhere
    a daemon thread checks ``os.getppid()`` every second instead. (Linux counts the parent *thread*
    that started this process; torchrun starts its workers, and :func:`launch` torchrun, from their
    main threads, which live as long as their processes.)

    ``expected_parent``: the pid the parent had when it started this process. A parent that died
    before this call sends nothing, so then ``sig`` is raised at once.
    """
    sig = signal.SIGKILL if sig is None else sig  # looked up here: Windows has no SIGKILL
    parent = os.getppid() if expected_parent is None else expected_parent
    how = "watchdog"
    if sys.platform.startswith("linux"):
        try:
            if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):  # no usable libc: fall back to the thread
            pass
    if how == "watchdog":
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), sig)

        threading.Thread(target=watch, name="layerwise-parent-watchdog", daemon=True).start()
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return how


def expected_launcher() -> int | None:
    """The parent pid that :data:`LAUNCHER_PID_ENV` announces, if it is set and a number."""
    text = os.environ.get(LAUNCHER_PID_ENV, "")
    return int(text) if text.isdigit() else None


def check_batch_divides(batch_size: int, world: int) -> None:
    """Every rank takes an equal share of each global batch, so the batch must split evenly."""
    if batch_size % world:
        raise LayerwiseError(f"data.batch_size {batch_size} does not split evenly over {world} processes; "
                             f"choose a batch size that is a multiple of {world}")


class GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward keeps this rank's slice of the gradient, with no
    communication (valid because every rank computes the same loss; see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world: int, process_group=None) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return gather(tensor, world, process_group)

    @staticmethod
    def backward(ctx, grad_all: torch.Tensor):
        return grad_all.narrow(0, ctx.rank * ctx.rows, ctx.rows), None, None, None


class ShardedBlock(nn.Module):
    """A block as a local loss sees it in a data-parallel rank (``ctx.block``).

    The loss is computed on the global batch, identically on every rank, and each rank's gradient
    keeps only its own rows before the ranks' gradients are summed. Running the whole block on a
    gathered input would give every rank the full gradient of that term, counted ``world`` times
    in the sum; so this runs the block on this rank's share of the input's first dimension and
    gathers the outputs with :class:`GatherWithGrad`, exactly like the block's own output.
    """

    def __init__(self, block: nn.Module, group: Group):
        super().__init__()
        self.block = block
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = self.group.world
        if x.shape[0] % world:
            raise LayerwiseError(f"in {world} processes, an objective's ctx.block(...) runs each process's share "
                                 f"of its input's first dimension, which must divide by {world}; found {x.shape[0]}")
        share = x.tensor_split(world)[self.group.rank]
        return self.group.gather_with_grad(self.block(share))


class AllReduceSum(torch.autograd.Function):
    """The sum over ranks of ``tensor``, differentiable: the backward sums the gradient over ranks.

    Each rank's loss depends on every rank's share through the sum, so the gradient that reaches
    this rank's share is the sum of what every rank's loss sends back through the sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, process_group=None) -> torch.Tensor:
        ctx.process_group = process_group
        total = tensor.clone()
        dist.all_reduce(total, group=process_group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.process_group)
        return total, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch-norm over the global batch of a data-parallel step (any input rank: (N, C, ...)).

    Same parameters and buffers as ``nn.BatchNorm1d/2d``, so checkpoints do not change. In
    training mode, the mean and the (biased) variance per channel are all-reduced sums divided
    by the global count, taken in two passes (the mean first) for float32 accuracy; the running
    averages get the unbiased variance, as in PyTorch. Outside training it is plain batch-norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions, got {input.dim()}")

    # The processes that share the batch: the default group, or a pipeline stage's replicas.
    process_group = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        if not (self.training and world > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.numel() // input.shape[1] * world  # every rank has an equal share
        mean = AllReduceSum.apply(input.sum(dims), self.process_group) / count
        centered = input - mean.view(shape)
        var = AllReduceSum.apply(centered.square().sum(dims), self.process_group) / count
        output = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self.update_running_stats(mean.detach(), var.detach() * count / max(count - 1, 1))
        return output

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """As ``nn.BatchNorm`` does: an exponential average, or a cumulative one with momentum None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def use_global_batch_norm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``BatchNorm1d/2d`` inside ``module`` by a :class:`GlobalBatchNorm` with the
    same parameters, buffers and settings, over ``process_group`` (default: all processes); return ``module``."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            replacement.process_group = process_group
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            like = next(iter([*child.parameters(), *child.buffers()]), None)
            setattr(module, name, replacement if like is None else replacement.to(like.device, like.dtype))
        else:
            use_global_batch_norm(child, process_group)
    return module


def gather(tensor: torch.Tensor, world: int, process_group=None) -> torch.Tensor:
    """Every rank's ``tensor`` (equal shapes), concatenated along dim 0 in rank order; no gradient."""
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=process_group)
    return torch.cat(parts)


@dataclass(frozen=True)
class Group:
    """This process's place in a data-parallel job, and the few collectives the trainer needs."""

    rank: int
    world: int
    device: torch.device  # where collective buffers live (a CUDA device for nccl)
    # The processes this group spans: None for all of them; a pipeline stage's replicas otherwise
    # (``rank`` and ``world`` are then the replica's number and the replica count).
    process_group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes the run folder."""
        return self.rank == 0

    def shard(self) -> tuple[int, int]:
        """``(rank, world)``, the argument of :class:`~layerwise.data.BatchStream`."""
        return self.rank, self.world

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The global batch of ``tensor``, without gradient (inputs, labels)."""
        return gather(tensor, self.world, self.process_group)

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """The global batch of ``tensor``; gradients flow back to this rank's rows only."""
        return GatherWithGrad.apply(tensor, self.rank, self.world, self.process_group)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its sum over ranks: one flat all-reduce per dtype, not one per tensor."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for same_dtype in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in same_dtype]).to(self.device)
            dist.all_reduce(flat, group=self.process_group)
            for tensor, part in zip(same_dtype, flat.split([t.numel() for t in same_dtype]), strict=True):
                tensor.copy_(part.view_as(tensor))

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (so all ranks stop together)."""
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, group=self.process_group)
        return bool(value.item() > 0)

    def generator_states(self) -> list[torch.Tensor]:
        """Every rank's torch generator state, in rank order, on every rank (for the resume state)."""
        states = gather(torch.get_rng_state().to(self.device), self.world, self.process_group).cpu()
        return list(states.view(self.world, -1).unbind())

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (seeding already should; this makes sure)."""
        # The group's first process: rank 0 of all, or its global rank within a sub-group.
        source = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=source, group=self.process_group)


@contextlib.contextmanager
def joined(device: torch.device, batch_size: int, stages: int = 1) -> Iterator[Group | None]:
    """Join the process group ``torchrun`` set up for this process; yield None when not launched by it.

    gloo on the CPU, nccl on CUDA (each rank on the GPU numbered by its ``LOCAL_RANK``; use
    ``group.device``). Ranks other than 0 have their console output silenced, so a run prints one
    set of lines and bars.
    """
    world = launched_world_size()
    if world == 1 and stages > 1:
        raise LayerwiseError(f"train.stages is {stages}, so the network needs {stages} processes: train it with "
                             f"'layerwise train RECIPE', which starts them, or under torchrun "
                             f"--nproc_per_node {stages}")
    if world == 1:
        yield None
        return
    # Workers die with torchrun: SIGKILL, since a worker may be blocked in a collective, and what
    # it has saved is whole at any instant (atomic writes).
    die_with_parent(signal.SIGKILL, expected_launcher())
    timeout = collective_timeout()
    if int(os.environ["RANK"]) != 0:
        # For the rest of the process, and errors included: the ranks fail alike (the data, the
        # recipe and, through the shared all-reduce, the non-finite watch are the same everywhere),
        # so rank 0's message is the one to read.
        from layerwise.progress import stderr, stdout

        # A pipeline's stages fail differently (a NaN in one stage's block): each says its own error.
        stdout.quiet, stderr.quiet = True, stages == 1
    if world % stages:
        raise LayerwiseError(f"{world} processes cannot form replicas of {stages} pipeline stages; start a multiple "
                             f"of {stages}")
    check_batch_divides(batch_size, world // stages)  # a pipeline's stages each read the whole batch
    if device.type == "cuda":
        local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
        if local_world > gpus:  # checked by every rank, so that rank 0 says it
            raise LayerwiseError(f"{local_world} processes on this machine but only {gpus} GPU(s): nccl needs one "
                                 f"GPU per process; start at most {gpus}, or set train.device=cpu")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    group = Group(rank=dist.get_rank(), world=dist.get_world_size(), device=device)
    try:
        yield group
    except RuntimeError as exc:  # torch's DistBackendError included
        if not any(word in str(exc).lower() for word in ("timed out", "timeout")):
            raise
        raise LayerwiseError(
            f"rank {group.rank}: the other processes did not answer within {timeout.total_seconds():g} s "
            f"(${TIMEOUT_ENV}); one of them is stopped, hung or much slower. If this run needs longer "
            f"pauses (a long evaluation on rank 0), set {TIMEOUT_ENV} to more seconds"
        ) from None
    finally:
        dist.destroy_process_group()


def launch(nproc: int, args: list[str], stages: int = 1) -> int:
    """Run ``ARGS`` (a ``layerwise`` command line) in ``nproc`` processes under torchrun; return the exit code.

    The command is ``python -m layerwise.distributed --standalone --nproc_per_node NPROC -m layerwise
    ARGS``: torchrun's own ``run``, wrapped (see :func:`torchrun_main`) so that a failed worker is
    reported here as one line naming its rank and the command that resumes the run, instead of
    torchrun's traceback. torchrun and its workers die with this process and with each other
    (:func:`die_with_parent`), so no worker trains on, unseen, after a kill.

    Ctrl-C reaches torchrun as well (same process group), and torchrun passes it to the workers,
    which stop together at a batch boundary; so this process ignores it while it waits, instead of
    killing torchrun and orphaning them.
    """
    collective_timeout()  # a bad value is one line here, not one failure per worker
    command = [sys.executable, "-m", "layerwise.distributed", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "layerwise", *args]
    run_before = launched_run(args)
    with tempfile.TemporaryDirectory(prefix="layerwise-launch-") as folder:
        report = Path(folder) / "failure.json"
        # The stage count goes to the workers only: it may differ from the recipe's on a resume.
        env = {**os.environ, REPORT_ENV: str(report), LAUNCHER_PID_ENV: str(os.getpid()), STAGES_ENV: str(stages)}
        process = subprocess.Popen(command, env=env)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = process.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        failure = json.loads(report.read_text()) if report.is_file() else None
    if code == 0 or code == 128 + signal.SIGINT:  # done, or Ctrl-C: rank 0 has said what was saved
        return code
    run = launched_run(args)
    if run is not None and "--resume" not in args and run == run_before:
        run = None  # runs/latest still names an older run: this one never made its folder
    from rich.markup import escape

    from layerwise.progress import stderr

    message = failure_message(code, failure, nproc, run, stages)
    stderr.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code if code > 0 else 128 - code


def launched_run(args: list[str]) -> Path | None:
    """The run folder a ``train`` command line trains in, as far as it is known now.

    With ``--resume`` it is the folder before that flag (the CLI resolves it before launching);
    otherwise rank 0 makes a new folder and points ``RUNS_DIR/latest`` at it, so this is where
    ``latest`` points (None while there is none)."""
    if "--resume" in args:
        return Path(args[args.index("--resume") - 1])
    runs_dir = Path(args[args.index("--runs-dir") + 1]) if "--runs-dir" in args[:-1] else Path("runs")
    latest = runs_dir / "latest"
    return latest.resolve() if latest.exists() else None


def process_name(rank: int, world: int, stages: int) -> str:
    """'rank 1 of 2', or for a pipeline 'stage 1 of 2' ('stage 1 of 2 in replica 0 of 2' with data parallelism)."""
    if stages == 1:
        return f"rank {rank} of {world}"
    replicas = world // stages
    replica = f" in replica {rank // stages} of {replicas}" if replicas > 1 else ""
    return f"stage {rank % stages} of {stages}{replica}"


def failure_message(code: int, failure: dict | None, nproc: int, run: Path | None, stages: int = 1) -> str:
    """One line: which process failed and how, and how to go on (``stages`` > 1: a pipeline's;
    ``nproc`` counts every process)."""
    if failure is not None:
        who = process_name(failure["rank"], nproc, stages)
        what = f"{who} {describe_exit(failure['exitcode'])}, so torchrun stopped the others"
    else:  # torchrun itself ended without a report: killed, or it failed before starting the workers
        what = f"torchrun, which ran the {nproc} processes, {describe_exit(code)}; its workers stop with it"
    if run is None:
        return f"{what}. No run folder was made, so there is nothing to resume"
    count = " ".join([*([f"--nproc {nproc // stages}"] if nproc > stages else []),
                      *([f"--stages {stages}"] if stages > 1 else [])])
    return f"{what}. Resume the run with: layerwise train --resume {run} {count}"


def describe_exit(code: int) -> str:
    """'was killed by SIGKILL' or 'exited with code 2' (a negative code is a signal, as subprocess gives it)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def torchrun_main(argv: list[str]) -> int:
    """torchrun (``torch.distributed.run``) with its arguments ``argv``, minus its failure traceback.

    A worker's failure makes torchrun stop the others and raise ``ChildFailedError``, which it
    prints as some 40 lines of traceback and summary. Here the first failure is written to
    ``$LAYERWISE_LAUNCH_REPORT`` instead, for :func:`launch` to say in one line, and the exit code
    is the worker's (128 + N for signal N, as a shell reports it).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # SIGTERM, not SIGKILL: torchrun then stops its workers itself (and they die with it anyway).
    die_with_parent(signal.SIGTERM, expected_launcher())
    # Its log lines on a failure ("Sending process ... closing signal", "failed (exitcode ...)")
    # say what the one-line report says; torch.distributed.run's own notices are kept. Each
    # elastic logger has a level of its own (torch sets it from $LOGLEVEL), so each is set.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # for the workers: torchrun's environment is theirs
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if os.environ.get(REPORT_ENV):
            Path(os.environ[REPORT_ENV]).write_text(json.dumps({"rank": rank, "exitcode": failure.exitcode}))
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as exc:  # Ctrl-C or SIGTERM: torchrun has passed it on to the workers
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":  # python -m layerwise.distributed TORCHRUN-ARGS: see launch()
    sys.exit(torchrun_main(sys.argv[1:]))
