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
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from layerwise.errors import LayerwiseError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Set by ``torchrun`` (``torch.distributed.run``) in every process it starts."""

STOP_CHECK_EVERY = 10
"""Batches between the ranks' votes on Ctrl-C (each vote is a collective and a host sync)."""


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started this one among (1 when not launched by it)."""
    if not all(name in os.environ for name in LAUNCH_VARIABLES):
        return 1
    return int(os.environ["WORLD_SIZE"])


def check_batch_divides(batch_size: int, world: int) -> None:
    """Every rank takes an equal share of each global batch, so the batch must split evenly."""
    if batch_size % world:
        raise LayerwiseError(f"data.batch_size {batch_size} does not split evenly over {world} processes; "
                             f"choose a batch size that is a multiple of {world}")


class GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward keeps this rank's slice of the gradient, with no
    communication (valid because every rank computes the same loss; see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return gather(tensor, world)

    @staticmethod
    def backward(ctx, grad_all: torch.Tensor):
        return grad_all.narrow(0, ctx.rank * ctx.rows, ctx.rows), None, None


class AllReduceSum(torch.autograd.Function):
    """The sum over ranks of ``tensor``, differentiable: the backward sums the gradient over ranks.

    Each rank's loss depends on every rank's share through the sum, so the gradient that reaches
    this rank's share is the sum of what every rank's loss sends back through the sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total)
        return total


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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.numel() // input.shape[1] * dist.get_world_size()  # every rank has an equal share
        mean = AllReduceSum.apply(input.sum(dims)) / count
        centered = input - mean.view(shape)
        var = AllReduceSum.apply(centered.square().sum(dims)) / count
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


def use_global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d/2d`` inside ``module`` by a :class:`GlobalBatchNorm` with the
    same parameters, buffers and settings; return ``module``."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            like = next(iter([*child.parameters(), *child.buffers()]), None)
            setattr(module, name, replacement if like is None else replacement.to(like.device, like.dtype))
        else:
            use_global_batch_norm(child)
    return module


def gather(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's ``tensor`` (equal shapes), concatenated along dim 0 in rank order; no gradient."""
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


@dataclass(frozen=True)
class Group:
    """This process's place in a data-parallel job, and the few collectives the trainer needs."""

    rank: int
    world: int
    device: torch.device  # where collective buffers live (a CUDA device for nccl)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes the run folder."""
        return self.rank == 0

    def shard(self) -> tuple[int, int]:
        """``(rank, world)``, the argument of :class:`~layerwise.data.BatchStream`."""
        return self.rank, self.world

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The global batch of ``tensor``, without gradient (inputs, labels)."""
        return gather(tensor, self.world)

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """The global batch of ``tensor``; gradients flow back to this rank's rows only."""
        return GatherWithGrad.apply(tensor, self.rank, self.world)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its sum over ranks: one flat all-reduce per dtype, not one per tensor."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for same_dtype in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in same_dtype]).to(self.device)
            dist.all_reduce(flat)
            for tensor, part in zip(same_dtype, flat.split([t.numel() for t in same_dtype])):
                tensor.copy_(part.view_as(tensor))

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (so all ranks stop together)."""
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def generator_states(self) -> list[torch.Tensor]:
        """Every rank's torch generator state, in rank order, on every rank (for the resume state)."""
        states = gather(torch.get_rng_state().to(self.device), self.world).cpu()
        return list(states.view(self.world, -1).unbind())

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (seeding already should; this makes sure)."""
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


@contextlib.contextmanager
def joined(device: torch.device, batch_size: int) -> Iterator[Group | None]:
    """Join the process group ``torchrun`` set up for this process; yield None when not launched by it.

    gloo on the CPU, nccl on CUDA (each rank on the GPU numbered by its ``LOCAL_RANK``; use
    ``group.device``). Ranks other than 0 have their console output silenced, so a run prints one
    set of lines and bars.
    """
    world = launched_world_size()
    if world == 1:
        yield None
        return
    if int(os.environ["RANK"]) != 0:
        # For the rest of the process, and errors included: the ranks fail alike (the data, the
        # recipe and, through the shared all-reduce, the non-finite watch are the same everywhere),
        # so rank 0's message is the one to read.
        from layerwise.progress import stderr, stdout

        stdout.quiet = stderr.quiet = True
    check_batch_divides(batch_size, world)
    if device.type == "cuda":
        local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
        if local_world > gpus:  # checked by every rank, so that rank 0 says it
            raise LayerwiseError(f"{local_world} processes on this machine but only {gpus} GPU(s): nccl needs one "
                                 f"GPU per process; start at most {gpus}, or set train.device=cpu")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    group = Group(rank=dist.get_rank(), world=dist.get_world_size(), device=device)
    try:
        yield group
    finally:
        dist.destroy_process_group()


def launch(nproc: int, args: list[str]) -> int:
    """Run ``torchrun --standalone --nproc_per_node NPROC -m layerwise ARGS`` and return its exit code.

    Ctrl-C reaches torchrun as well (same process group), and torchrun passes it to the workers,
    which stop together at a batch boundary; so this process ignores it while it waits, instead of
    killing torchrun and orphaning them.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "layerwise", *args]
    process = subprocess.Popen(command)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
