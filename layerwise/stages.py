"""Cutting a network into pipeline stages: which cuts are free, and where to put them.

A *cut at position k* splits the blocks in evaluation order into ``order[:k]`` and ``order[k:]``:
one stage runs the first part, the next stage the rest. Forward, a stage only has to send the
outputs its successors read (:func:`boundary_tensors`); every stage reads the network's input
(and the labels, which local objectives need) from its own data stream.

Backward is what makes a cut costly. A local block's loss trains only its own parameters, and
the global cross-entropy trains only ``none`` blocks, but its gradient also flows *through* local
blocks to earlier ``none`` blocks unless a block sets ``detach: true``
(:meth:`~layerwise.graph.Network.global_gradient_blocks`). A cut is **free** when no global
gradient crosses it: no tensor sent forward over it ever gets a gradient sent back. A stage behind
a free cut can then train on batch ``t`` while the next stage is still on batch ``t-1``, and the
stages never wait for one another's backward pass: the pipeline needs no backward exchange at all.
A cut that the global gradient crosses would need a gradient sent back for every batch, and the
earlier stage would have to keep its activations until it arrives: that is not supported.

Stages are balanced by estimated work: :func:`block_costs` measures each block's forward and
backward FLOPs with PyTorch's own ``FlopCounterMode``, and :func:`plan_stages` picks the free cuts
that minimise the largest stage's cost.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from layerwise.errors import LayerwiseError
from layerwise.graph import Network, merged_shape
from layerwise.objectives.base import KernelCache, LossContext
from layerwise.registry import did_you_mean
from layerwise.topology import INPUT

# ----------------------------------------------------------------------------- which cuts are free


def check_position(net: Network, k: int) -> None:
    """A cut position lies strictly between the first and the last block."""
    if not 1 <= k < len(net.order):
        raise LayerwiseError(f"{net.name}: cut position {k} is out of range: a network of {len(net.order)} "
                             f"blocks has cuts at positions 1 to {len(net.order) - 1}")


def crossing_edges(net: Network, k: int) -> list[tuple[str, str]]:
    """``(source, reader)`` pairs across cut ``k`` that the global gradient flows back along.

    A gradient crosses when the source is in the global gradient's path and the reader passes the
    gradient on to its input (it is on the path too and does not detach). Testing edges, not just
    "some block before the cut is on the path", keeps cuts after the head free when blocks that
    do not lead to the head come after it in evaluation order.
    """
    through = net.global_gradient_blocks()
    before = set(net.order[:k])
    return [(src, name) for name in net.order[k:] for src in net.deps[name]
            if src in before and src in through and name in through and not net.blocks[name].detach]


def is_free(net: Network, k: int) -> bool:
    """True when no global gradient crosses the cut at position ``k``."""
    check_position(net, k)
    return not crossing_edges(net, k)


def free_cuts(net: Network) -> list[int]:
    """Positions (1 to ``len(net.order) - 1``) of the free cuts, in order."""
    return [k for k in range(1, len(net.order)) if is_free(net, k)]


def crossing_blocks(net: Network, k: int) -> list[str]:
    """For a cut the global gradient crosses, the trainable ``none`` blocks before it whose
    gradient is what crosses (in order); when none is one (a frozen or parameterless block made
    the path), the blocks before the cut that the crossing gradient flows through. Empty for a
    free cut."""
    check_position(net, k)
    through = net.global_gradient_blocks()
    before = set(net.order[:k])
    # Follow the crossing gradient backwards from the sources it crosses at, as far as it flows.
    reached: set[str] = set()
    pending = [src for src, _ in crossing_edges(net, k)]
    while pending:
        name = pending.pop()
        if name in reached:
            continue
        reached.add(name)
        if not net.blocks[name].detach:
            pending.extend(src for src in net.deps[name] if src in before and src in through)
    path = [name for name in net.order[:k] if name in reached]
    trained = [name for name in path if is_trained_by_backprop(net, name)]
    return trained or path


def is_trained_by_backprop(net: Network, name: str) -> bool:
    """An unfrozen ``none`` block with parameters the global loss trains."""
    block = net.blocks[name]
    return not block.local and not block.freeze and any(p.requires_grad for p in block.body.parameters())


def boundary_tensors(net: Network, k: int) -> list[str]:
    """Blocks before cut ``k`` whose output a block at or after it reads: what the cut carries
    forward (never ``"input"``: every stage reads the network input from its own data stream)."""
    check_position(net, k)
    later = net.order[k:]
    return [name for name in net.order[:k] if any(name in net.deps[reader] for reader in later)]


def gradient_phrase(net: Network, k: int) -> str:
    """``global gradient to 'bp1'``: what crosses a cut that is not free."""
    names = crossing_blocks(net, k)
    trained = names and is_trained_by_backprop(net, names[0])
    quoted = ", ".join(f"'{n}'" for n in names)
    return f"global gradient to {quoted}" if trained else f"global gradient through {quoted}"


def not_free_reason(net: Network, k: int) -> str:
    """One clause saying why the cut at ``k`` is not free."""
    names = crossing_blocks(net, k)
    quoted = ", ".join(f"'{n}'" for n in names)
    after = f"the cut after '{net.order[k - 1]}' is not free"
    if names and is_trained_by_backprop(net, names[0]):
        kind = "backprop block" if len(names) == 1 else "backprop blocks"
        return f"{after}: the global gradient to {kind} {quoted} crosses it"
    return f"{after}: the global gradient through {quoted} crosses it"


# ----------------------------------------------------------------------------- estimated work


def block_costs(net: Network, batch_size: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Estimated FLOPs of one training step per block at ``batch_size``, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on random inputs of each block's shape.

    Each block is measured as the trainer runs it: its forward; for a local block, its
    objective's loss and that loss's backward into the block's parameters; for a block on the
    global gradient's path, the backward of its output into its parameters (a ``none`` block) and
    into its input (when the gradient goes on upstream). A block counted as zero (a reshape,
    say) costs 1.0, so every stage has some weight. The network, its gradients and batch-norm
    statistics are left as they were (each block is measured on a copy), and so is torch's
    random state.

    What the local blocks of a batch share (the input's and the labels' kernels, cached in
    ``LossContext.kernels``) is computed once and left out of every block's cost: each stage
    computes it once per batch whichever blocks it holds, so it does not move the balance.
    """
    if not net.materialized:
        raise LayerwiseError(f"{net.name}: the network has not seen an input yet, so its blocks' costs are unknown")
    device = torch.device(device)
    through = net.global_gradient_blocks()
    costs: dict[str, float] = {}
    kernels = SharedKernels()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x = torch.randn(batch_size, *net.input_shape, device=device)
        y = torch.randint(net.num_classes, (batch_size,), device=device)
        for name in net.order:
            costs[name] = max(measure_block(net, name, through, x, y, kernels), 1.0)
    return costs


def measure_block(net: Network, name: str, through: set[str], x: torch.Tensor, y: torch.Tensor,
                  kernels: SharedKernels) -> float:
    """FLOPs of one training step of block ``name`` (see :func:`block_costs`)."""
    original = net.blocks[name]
    # A copy: the backward below must not leave gradients or moved statistics in the caller's model.
    block = copy.deepcopy(original).to(x.device)
    block.train(not original.freeze)  # the trainer keeps frozen blocks in eval mode
    in_shape = merged_shape([net.shapes[src] for src in net.deps[name]])
    on_global_path = name in through
    gradient_to_input = on_global_path and not block.detach and any(src in through for src in net.deps[name])
    block_input = torch.randn(x.shape[0], *in_shape, device=x.device, requires_grad=gradient_to_input)
    with FlopCounterMode(display=False) as counter:
        kernels.watch(counter)
        out = block(block_input)
        if block.local and not block.freeze:
            ctx = LossContext(x=x, y=y, num_classes=net.num_classes, block_input=block_input, kernels=kernels)
            loss, _ = block.objective.loss(out, ctx)
            params = [p for p in block.parameters() if p.requires_grad]  # the body's and the objective's
            if params and loss.requires_grad:
                loss.backward(inputs=params, retain_graph=True)
        if on_global_path:
            wrt = [p for p in block.body.parameters() if p.requires_grad] if not block.local else []
            wrt += [block_input] if gradient_to_input else []
            if wrt and out.requires_grad:
                out.backward(torch.ones_like(out), inputs=wrt)
    return float(counter.get_total_flops() - kernels.spent)


class SharedKernels(KernelCache):
    """One batch's kernel cache, shared by every block measured, that sets aside the FLOPs spent
    filling it (``spent``, since the last :meth:`watch`) so that no block is charged for them."""

    def __init__(self) -> None:
        super().__init__()
        self.counter: FlopCounterMode | None = None
        self.spent = 0
        self.depth = 0  # a computation may fill other entries: count only the outermost

    def watch(self, counter: FlopCounterMode) -> None:
        """Count what filling the cache costs under ``counter`` from now on."""
        self.counter, self.spent = counter, 0

    def get(self, key, compute):
        size, before = len(self), self.counter.get_total_flops() if self.counter else 0
        self.depth += 1
        try:
            value = super().get(key, compute)
        finally:
            self.depth -= 1
        if self.counter is not None and self.depth == 0 and len(self) > size:
            self.spent += self.counter.get_total_flops() - before
        return value


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class StagePlan:
    """Blocks per stage (in evaluation order), each stage's estimated cost, the cut positions
    between stages, and for each cut the block outputs it carries forward."""

    stages: list[list[str]]
    costs: list[float]
    cuts: list[int]
    boundaries: list[list[str]]

    @property
    def shares(self) -> list[float]:
        """Each stage's fraction of the total estimated work."""
        total = sum(self.costs)
        return [c / total if total > 0 else 1 / len(self.costs) for c in self.costs]


def plan_stages(net: Network, n: int, costs: dict[str, float], cuts: Sequence[str] | None = None) -> StagePlan:
    """``n`` stages at free cuts, chosen to minimise the largest stage's cost (ties go to the
    earliest cuts), or at the ``n - 1`` cuts named by ``cuts`` (block names to cut after)."""
    blocks = len(net.order)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LayerwiseError(f"{net.name}: the number of stages must be a whole number of at least 1, found {n!r}")
    if n > blocks:
        raise LayerwiseError(f"{net.name}: cannot cut {blocks} blocks into {n} stages: at most {blocks} stages, "
                             f"one block each")
    missing = [name for name in net.order if name not in costs]
    if missing:
        raise LayerwiseError(f"{net.name}: no cost given for blocks {', '.join(missing)}")
    free = free_cuts(net)
    if cuts is None:
        if len(free) < n - 1:
            first = next(k for k in range(1, blocks) if k not in free)
            raise LayerwiseError(f"{net.name}: cannot cut into {n} stages: only {len(free)} of its {blocks - 1} cuts "
                                 f"{'is' if len(free) == 1 else 'are'} free, so at most {len(free) + 1} stages are "
                                 f"possible; "
                                 f"{not_free_reason(net, first)}")
        positions = balanced_cuts(net, n, costs, free)
    else:
        positions = named_cuts(net, n, list(cuts), free)
    bounds = [0, *positions, blocks]
    stages = [net.order[a:b] for a, b in itertools.pairwise(bounds)]
    return StagePlan(stages=stages, costs=[sum(costs[name] for name in stage) for stage in stages],
                     cuts=positions, boundaries=[boundary_tensors(net, k) for k in positions])


def balanced_cuts(net: Network, n: int, costs: dict[str, float], free: list[int]) -> list[int]:
    """The ``n - 1`` free cuts minimising the largest stage cost, earliest first among equals:
    exact dynamic programming over the free positions."""
    blocks = len(net.order)
    prefix = [0.0]
    for name in net.order:
        prefix.append(prefix[-1] + costs[name])

    def cost(a: int, b: int) -> float:  # one function for search and reconstruction: equal sums compare equal
        return prefix[b] - prefix[a]

    @functools.cache
    def best(stages: int, start: int) -> float:
        """Smallest largest-stage cost for blocks ``order[start:]`` in ``stages`` stages."""
        if stages == 1:
            return cost(start, blocks)
        options = [max(cost(start, k), best(stages - 1, k)) for k in free if k > start]
        return min(options, default=float("inf"))

    # Walk forward taking the earliest cut that still reaches the optimum.
    start, positions = 0, []
    for stages in range(n, 1, -1):
        start = next(k for k in free if k > start and max(cost(start, k), best(stages - 1, k)) == best(stages, start))
        positions.append(start)
    return positions


def named_cuts(net: Network, n: int, names: list[str], free: list[int]) -> list[int]:
    """Positions of cuts named by the blocks they follow, checked: blocks, in order, free."""
    if len(names) != n - 1:
        raise LayerwiseError(f"{net.name}: {n} stages need {n - 1} cuts, found {len(names)} ({', '.join(names)})")
    positions = []
    for name in names:
        if name not in net.blocks:
            raise LayerwiseError(f"{net.name}: cannot cut after '{name}': no such block"
                                 f"{did_you_mean(name, list(net.order) + [INPUT])}")
        k = net.order.index(name) + 1
        if k == len(net.order):
            raise LayerwiseError(f"{net.name}: cannot cut after '{name}': it is the last block")
        if positions and k <= positions[-1]:
            raise LayerwiseError(f"{net.name}: cuts must follow the evaluation order ({', '.join(net.order)}): "
                                 f"'{name}' does not come after '{net.order[positions[-1] - 1]}'")
        if k not in free:
            raise LayerwiseError(f"{net.name}: {not_free_reason(net, k)}")
        positions.append(k)
    return positions


def describe_plan(net: Network, plan: StagePlan, costs: dict[str, float] | None = None) -> list[str]:
    """Lines for ``layerwise validate --stages N``: each stage's blocks and share of the work
    (from ``costs`` when given, else the plan's), then which cuts of the network are free."""
    shares = plan.shares
    if costs is not None:
        total = sum(costs[name] for stage in plan.stages for name in stage)
        shares = [sum(costs[name] for name in stage) / total if total > 0 else share
                  for stage, share in zip(plan.stages, shares, strict=True)]
    lines = [f"stage {i}: {', '.join(stage)} (estimated {share:.0%} of the work)"
             for i, (stage, share) in enumerate(zip(plan.stages, shares, strict=True))]
    if len(net.order) == 1:
        return [*lines, "free cuts: none (the network has a single block)"]
    free = free_cuts(net)
    free_text = ", ".join(f"after {net.order[k - 1]}" for k in free) or "none"
    blocked = [f"after {net.order[k - 1]} ({gradient_phrase(net, k)})" for k in range(1, len(net.order))
               if k not in free]
    return [*lines, f"free cuts: {free_text}; not free: {', '.join(blocked) or 'none'}"]
