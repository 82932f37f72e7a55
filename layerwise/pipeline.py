"""Block-parallel training: each stage of blocks in its own process, pipelined, computing exactly
what one process computes. docs/distributed.md is the user's guide; this is how it works.

A network is cut into stages at *free* cuts, where no global gradient crosses (see
:mod:`layerwise.stages`). Process ``s`` (rank ``s`` of ``torchrun``) holds stage ``s`` only: its
blocks' weights, objectives, optimizers and kernels; the other blocks' weights are moved to the
meta device once the network is built (every process builds the whole network from the same seed
first, so each block starts from the weights one process would give it).

Per batch ``t``, stage ``s`` waits for the activations of batch ``t`` from stage ``s - 1``
(posted as an asynchronous receive while it worked on batch ``t - 1``), forwards them through
its blocks, sends each output a later stage reads as soon as it exists (an asynchronous send,
before the block's own local backward), trains its blocks and steps its optimizers. So stage
``s`` works on batch ``t`` while stage ``s - 1`` already works on batch ``t + 1``.

Why this is exact, with no staleness. One process computes a block's output for batch ``t``
with the weights the block has before its own update for batch ``t``, and no loss of a later
block changes an earlier block's weights across a free cut. In the pipeline, stage ``s - 1``
sends its output for batch ``t`` before it steps on batch ``t``, computed from the same weights
and the same input; so stage ``s`` receives exactly the tensor one process would have passed it.
Labels and the network input (nHSIC's X term) come from each stage's own copy of the seeded batch
stream, which yields the same batches in every process, rather than over the wire.

The run folder is one process's: at each epoch's end the stages evaluate the test (and
validation) set through the same pipeline, then send their weights, optimizer states and
generator states to rank 0, which writes ``state.safetensors``, ``model.safetensors`` and
``metrics.jsonl`` exactly as one process does. A resume, with any stage count, reads them back.

What is refused: ``train.on_nonfinite: skip`` (every stage would have to know, before stepping,
that no later stage saw a NaN on that batch, which would serialise the pipeline) and
``train.precision: bf16`` (activations cross stages in the weights' dtype). With ``stop``, the
stage that meets a NaN stops the run with its usual message, and the last saved epoch is kept.
With data parallelism as well (``--nproc R --stages S``, R x S processes), rank ``r * S + s`` is
stage ``s`` of replica ``r``: each replica is a pipeline over its share of every batch, and the
R copies of a stage form a data-parallel group of their own (:class:`~layerwise.distributed.Group`
over a ``torch.distributed`` sub-group), which gathers the global batch for the local losses and
sums the stage's gradients, exactly as data parallelism does for a whole network.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from layerwise.distributed import STAGES_ENV, Group
from layerwise.errors import LayerwiseError
from layerwise.graph import Network
from layerwise.stages import StagePlan, block_costs, boundary_tensors, describe_plan, plan_stages
from layerwise.trainer import Trainer, batch_tensors


def requested_stages(recipe_stages: int) -> int:
    """The stage count of this run: ``$LAYERWISE_STAGES`` when the CLI launched it, else the recipe's."""
    text = os.environ.get(STAGES_ENV, "").strip()
    return int(text) if text else recipe_stages


def check_pipeline_recipe(recipe, stages: int) -> None:
    """Refuse the settings a pipeline cannot run exactly (see the module docstring)."""
    if stages < 2:
        return
    if recipe.model.streams is not None:
        raise LayerwiseError(f"model.streams cannot run in {stages} pipeline stages yet; train in one process")
    if recipe.train.on_nonfinite == "skip":
        raise LayerwiseError(f"train.on_nonfinite: skip cannot run in {stages} pipeline stages (each stage would "
                             f"wait for every later one before stepping); use stop, or train in one process")
    if recipe.train.precision == "bf16":
        raise LayerwiseError(f"train.precision: bf16 cannot run in {stages} pipeline stages yet (activations cross "
                             f"stages in float32); use fp32, or train in one process")


@dataclass
class Received:
    """The tensors the current batch received from the previous stage (set by :meth:`Link.batches`)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Link:
    """One stage's asynchronous point-to-point traffic: what it receives and what it sends.

    Every send and receive carries a tag per boundary tensor, so the k-th send of a tensor meets
    the k-th receive of it whatever the interleaving; every wait has the collective timeout, so a
    stage that died or hangs ends its neighbours' waits with a clear line instead of forever.
    """

    def __init__(self, pipe: Pipeline, graph: Network):
        self.pipe = pipe
        dtype = next((p.dtype for p in graph.parameters() if p.device.type != "meta"), torch.float32)
        self.shapes = {name: graph.shapes[name] for name in pipe.receives + pipe.sends}
        self.order = list(graph.order)
        self.dtype = dtype
        self.sending: list[dist.Work] = []
        self.received = Received()
        self.waiting = 0.0  # seconds spent waiting for a neighbour's send or receive

    def tag(self, name: str) -> int:
        """The same number in the sending and the receiving stage: the block's place in the network."""
        return self.order.index(name)

    def post_receive(self, rows: int) -> list[tuple[str, torch.Tensor, dist.Work]]:
        """Start receiving one batch of ``rows`` samples from the previous stage."""
        pending = []
        for name in self.pipe.receives:
            buffer = torch.empty((rows, *self.shapes[name]), dtype=self.dtype, device=self.pipe.device)
            pending.append((name, buffer, dist.irecv(buffer, src=self.pipe.rank - 1, tag=self.tag(name))))
        return pending

    def wait_receive(self, pending: list[tuple[str, torch.Tensor, dist.Work]]) -> dict[str, torch.Tensor]:
        """The tensors of a posted receive, once they have arrived."""
        for _, _, work in pending:
            self.wait(work, "receive from", self.pipe.stage - 1)
        return {name: buffer for name, buffer, _ in pending}

    def publish(self, name: str, tensor: torch.Tensor) -> None:
        """Send ``tensor`` (block ``name``'s output) on when a later stage reads it."""
        if name in self.pipe.sends:
            self.sending.append(dist.isend(tensor.detach().contiguous(), dst=self.pipe.rank + 1, tag=self.tag(name)))

    def forward_received(self, tensors: dict[str, torch.Tensor]) -> None:
        """Pass on what this stage received but does not produce, for a stage further on (a skip connection)."""
        for name, tensor in tensors.items():
            self.publish(name, tensor)

    def settle_sends(self, keep: int) -> None:
        """Wait for all but the last ``keep`` sends, so a fast stage cannot run unboundedly ahead."""
        while len(self.sending) > keep:
            self.wait(self.sending.pop(0), "send to", self.pipe.stage + 1)

    def wait(self, work: dist.Work, what: str, peer: int) -> None:
        """Wait for one send or receive, adding the time to :attr:`waiting` (bubbles and communication)."""
        started = time.perf_counter()
        try:
            work.wait(self.pipe.timeout)
        except RuntimeError as exc:
            me = f"stage {self.pipe.stage} of {self.pipe.stages}"
            if any(word in str(exc).lower() for word in ("timed out", "timeout")):
                raise LayerwiseError(
                    f"{me}: could not {what} stage {peer} within {self.pipe.timeout.total_seconds():g} s "
                    f"($LAYERWISE_DIST_TIMEOUT): that stage is stopped, hung or much slower") from None
            raise LayerwiseError(f"{me}: lost its connection to stage {peer} during a {what.split()[0]}: that stage "
                                 f"has died") from None
        finally:
            self.waiting += time.perf_counter() - started

    def batches(self, stream) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` of each batch of ``stream``, with ``self.received`` holding what the previous
        stage sent for it; the next batch's receive is posted before this one is handed out."""
        sizes = batch_rows(stream)
        pending = self.post_receive(sizes[0]) if self.pipe.receives and sizes else []
        for index, (x, y, *_) in enumerate(stream):
            tensors = self.wait_receive(pending) if self.pipe.receives else {}
            if self.pipe.receives and index + 1 < len(sizes):
                pending = self.post_receive(sizes[index + 1])
            self.settle_sends(keep=2 * len(self.pipe.sends))
            self.forward_received({n: t for n, t in tensors.items() if n in self.pipe.sends})
            self.received.tensors = tensors
            yield x, y
        self.settle_sends(keep=0)


def batch_rows(stream) -> list[int]:
    """The number of samples in each batch ``stream`` yields (its shard of each, with data
    parallelism: ``tensor_split``'s sizes), known before any is drawn."""
    total, size = stream.num_samples, stream.batch_size
    rank, world = stream.shard
    whole = [min(size, total - start) for start in range(0, size * len(stream), size)]
    return [rows // world + (1 if rank < rows % world else 0) for rows in whole]


@dataclass
class Pipeline:
    """This process's stage in a pipeline of ``stages`` processes, and its traffic."""

    stage: int
    stages: int
    plan: StagePlan
    receives: list[str]
    sends: list[str]
    device: torch.device
    timeout: datetime.timedelta
    replica: int = 0  # with data parallelism: which copy of the pipeline this process belongs to
    replicas: int = 1
    data_group: Group | None = None  # this stage's replicas, when there are several

    @property
    def rank(self) -> int:
        """This process's rank: stage ``s`` of replica ``r`` is rank ``r * stages + s``."""
        return self.replica * self.stages + self.stage

    @property
    def blocks(self) -> list[str]:
        return self.plan.stages[self.stage]

    @property
    def is_main(self) -> bool:
        """Stage 0 of replica 0 prints and writes the run folder."""
        return self.rank == 0

    @property
    def has_head(self) -> bool:
        return self.stage == self.stages - 1

    def release_other_blocks(self, graph: Network) -> None:
        """Move the weights of every block this stage does not train to the meta device (no memory)."""
        for name in graph.order:
            if name not in self.blocks:
                graph.blocks[name].to("meta")

    def train_epoch(self, trainer: Trainer, stream, link: Link, **kwargs) -> dict:
        """One epoch of this stage (``kwargs`` as for :meth:`Trainer.train_epoch`)."""
        received = link.received

        def step(x: torch.Tensor, y: torch.Tensor):
            return trainer.step_on_device(x, y, received.tensors, link.publish)

        return trainer.train_epoch(link.batches(stream), step=step, **kwargs)

    @torch.no_grad()
    def evaluate(self, graph: Network, stream, link: Link) -> dict | None:
        """Accuracy and mean cross-entropy over ``stream``, computed through the pipeline; every
        stage takes part and rank 0 gets the result (the others get None)."""
        graph.eval()
        correct, loss_sum, samples = 0, 0.0, 0

        def send_on(name: str, _inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            link.publish(name, output)
            return output

        # Every replica holds the same weights: replica 0 alone evaluates, the others wait below.
        for x, y in link.batches(stream) if self.replica == 0 else ():
            x, y = batch_tensors((x, y), self.device)
            logits = graph.run(x, on_output=send_on, blocks=self.blocks, given=link.received.tensors).logits
            if logits is not None:
                correct += int((logits.argmax(dim=1) == y).sum())
                loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
                samples += y.shape[0]
        graph.train()
        result = {"acc": correct / samples, "loss": loss_sum / samples} if self.has_head and samples else None
        return self.to_main(result)

    def gather(self, value) -> list | None:
        """Every process's ``value`` on rank 0, replica 0's stages first (None elsewhere)."""
        values = [None] * (self.stages * self.replicas) if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def to_main(self, value):
        """``value`` from replica 0's last stage, on rank 0 (None elsewhere)."""
        values = self.gather(value)
        return values[self.stages - 1] if self.is_main else None

    def gather_summary(self, summary: dict, seconds: float, busy: float) -> dict | None:
        """The epoch's training summary of the whole network, on rank 0: each stage's block
        metrics, the head stage's accuracy and loss, and every stage's wall and busy seconds."""
        parts = self.gather({"summary": summary, "seconds": seconds, "busy": busy})
        if not self.is_main:
            return None
        parts = parts[:self.stages]  # replicas report the same metrics (summed over them already)
        merged = dict(parts[-1]["summary"])
        merged["blocks"] = {name: metrics for part in parts for name, metrics in part["summary"]["blocks"].items()}
        lrs = {}
        for part in parts:
            lrs.update(part["summary"].get("lr", {}))
        if lrs:
            merged["lr"] = lrs
        merged["stages"] = self.plan.stages
        merged["stage_seconds"] = [round(part["seconds"], 3) for part in parts]
        merged["stage_busy_seconds"] = [round(part["busy"], 3) for part in parts]
        return merged

    def gather_state(self, graph: Network, trainer: Trainer) -> tuple[dict, dict, list[torch.Tensor]] | None:
        """The whole network's state dict, every optimizer's state dict (in one process's order)
        and every stage's generator state, on rank 0; None elsewhere."""
        state = graph.state_dict()
        own = {key: t.detach().cpu() for key, t in state.items() if t.device.type != "meta"}
        optimizers = {name: opt.state_dict() for name, opt in trainer.optimizers().items()}
        everyone = self.gather({"weights": own, "optimizers": optimizers, "rng": torch.get_rng_state()})
        if not self.is_main:
            return None
        weights: dict[str, torch.Tensor] = {}
        states: dict[str, dict] = {}
        for part in everyone[:self.stages]:  # the replicas hold the same weights and moments
            weights.update(part["weights"])
            states.update(part["optimizers"])
        order = list(state)  # one process's key order
        names = [f"local.{b.name}" for b in graph.local_blocks()] + ["global"]
        return ({key: weights[key] for key in order}, {name: states[name] for name in names if name in states},
                [part["rng"] for part in everyone])


def recipe_stages(recipe) -> int:
    """The stage count a recipe asks for: one more than its named cuts (``train.cuts``), else ``train.stages``."""
    return len(recipe.train.cuts) + 1 if recipe.train.cuts else recipe.train.stages


def named_cuts(recipe, stages: int) -> list[str] | None:
    """The recipe's named cut points when they make ``stages`` stages, else None (cut automatically)."""
    return list(recipe.train.cuts) if recipe.train.cuts and len(recipe.train.cuts) + 1 == stages else None


def check_stages(recipe, stages: int) -> list[str]:
    """Plan ``recipe``'s network in ``stages`` stages, as its training would, and describe the plan;
    a plan that cannot be made (too few free cuts) raises its one-line error."""
    from layerwise.factory import build_model

    if stages < 1:
        raise LayerwiseError(f"--stages: expected a number of stages >= 1, found {stages}")
    with torch.random.fork_rng():
        graph = build_model(recipe)
    costs = block_costs(graph, recipe.data.batch_size)
    return describe_plan(graph, plan_stages(graph, stages, costs, named_cuts(recipe, stages)), costs)


def make_pipeline(graph: Network, recipe, stages: int, device: torch.device, timeout: datetime.timedelta,
                  group: Group) -> Pipeline:
    """This process's stage of ``recipe``'s network cut into ``stages`` balanced stages at free
    cuts; ``group`` spans every process (``stages`` x replicas), in which this one is ``group.rank``."""
    costs = block_costs(graph, recipe.data.batch_size)  # the same in every process: same network, same seed
    plan = plan_stages(graph, stages, costs, named_cuts(recipe, stages))
    stage, replica, replicas = group.rank % stages, group.rank // stages, group.world // stages
    data_group = None
    if replicas > 1:
        # Every process creates every stage's group, in the same order (torch.distributed requires it).
        subgroups = [dist.new_group([r * stages + s for r in range(replicas)]) for s in range(stages)]
        data_group = Group(rank=replica, world=replicas, device=device, process_group=subgroups[stage])
    receives = boundary_tensors(graph, plan.cuts[stage - 1]) if stage > 0 else []
    sends = boundary_tensors(graph, plan.cuts[stage]) if stage < stages - 1 else []
    return Pipeline(stage, stages, plan, receives, sends, device, timeout, replica, replicas, data_group)
