"""The trainer: one forward pass per batch, and each loss routed to the parameters it may train.

Routing (docs/design.md, section 2):
1. a local objective's loss reaches only its own block (and the objective's helper modules):
   ``loss.backward(inputs=block_params)``;
2. the global cross-entropy reaches only unfrozen ``none`` blocks:
   ``global_loss.backward(inputs=global_params)``;
3. the global gradient still flows *through* local blocks to earlier ``none`` blocks, unless a
   block sets ``detach: true``;
4. frozen blocks get no optimizer and no gradient.
Optimizers are built once and persist across batches, so momentum is kept.

With a :class:`~layerwise.distributed.Group` (several processes, each on a share of the batch),
local losses see the gathered global batch and every gradient is summed over the ranks before
the optimizers step; :mod:`layerwise.distributed` explains why that equals one process's step.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from layerwise.distributed import Group, ShardedBlock, use_global_batch_norm
from layerwise.errors import LayerwiseError, RecipeError, TrainingInterrupted
from layerwise.graph import Network
from layerwise.nonfinite import Key, NonFiniteWatch
from layerwise.objectives.base import KernelCache, LossContext
from layerwise.recipe import OptimizerConfig, Recipe, TrainConfig
from layerwise.schedule import ScheduleConfig, make_scheduler, schedule_config
from layerwise.schema import Problems, build


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` picks CUDA when present; ``cpu``, ``cuda`` and ``cuda:N`` must exist here.
    ``option`` names the setting in errors (``--device`` on the command line)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cpu|cuda(?::([0-9]{1,3}))?", name)
    if match is None:
        raise LayerwiseError(f"{option}: expected auto, cpu, cuda or cuda:N, found {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LayerwiseError(f"{option} is '{name}' but no CUDA device is available; use 'auto' or 'cpu'")
        if match[1] is not None and int(match[1]) >= torch.cuda.device_count():
            raise LayerwiseError(f"{option} is '{name}' but this machine has {torch.cuda.device_count()} CUDA "
                                 f"device(s), numbered from 0")
    return torch.device(name)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure: CUDA raises OutOfMemoryError, the CPU allocator a RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def out_of_memory_message(batch: int, device: torch.device) -> str:
    """One line for a step that ran out of memory: the batch size and the kernel size it implies."""
    gram = batch * batch * 4 / 2**30
    return (f"out of memory on {device} at data.batch_size {batch}: a local kernel objective builds {batch} x "
            f"{batch} Gram matrices, {gram:.3g} GiB each in float32, several per block; lower data.batch_size")


def optimizer_config(value: OptimizerConfig | dict | None, key: str) -> OptimizerConfig:
    """An optimizer config from a recipe's, or from a dict validated exactly like a recipe's
    ``optim.local``/``optim.global`` (same messages, with ``key`` as the key path)."""
    if value is None:
        return OptimizerConfig()
    if isinstance(value, OptimizerConfig):
        return value
    problems = Problems()
    config = build(OptimizerConfig, value, key, problems)
    if problems:
        raise RecipeError("Trainer", problems.items)
    return config


def batch_tensors(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` on ``device`` from a batch ``(x, y)`` or ``(x, y, idx)`` (a DataLoader's or a
    :class:`~layerwise.data.BatchStream`'s)."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise LayerwiseError(f"expected batches of (inputs, labels), found {type(batch).__name__}"
                             f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise LayerwiseError(f"expected batches of tensors, found ({type(x).__name__}, {type(y).__name__})")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.dim() != 1 or len(y) != len(x):
        raise LayerwiseError(f"expected integer class labels of shape ({len(x)},), found {y.dtype} of shape "
                             f"{tuple(y.shape)}")
    return x.to(device, non_blocking=True), y.to(device, torch.int64, non_blocking=True)


BLOWN_UP = 1e6
"""A block output larger than this, in absolute value, has exploded (activations of a healthy
network are of order 1 to 100); the first such block is blamed for a later NaN."""


def loss_weight_cause(objective, terms: dict[str, float]) -> str:
    """The cause when an objective's loss is non-finite although the terms it logs are finite:
    the loss combines them with a weight too large for the float range."""
    config = getattr(objective, "config", None)
    large = [f"{name} = {value:g}" for name, value in vars(config).items()
             if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= 1e6] if config else []
    found = f" ({', '.join(large)})" if large else ""
    shown = ", ".join(f"{name} {value:.3g}" for name, value in terms.items())
    return (f"its logged terms are finite ({shown}) but the loss that weighs them is not: an option of "
            f"the objective too large for the float range{found}")


def make_optimizer(cfg: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """An optimizer of the configured kind over ``params``."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    # fused: one kernel for all parameters instead of a Python loop of small ops (CPU and CUDA).
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


@dataclass
class EpochTotals:
    """Sums over an epoch's batches, kept on the device so the hot loop never syncs."""

    samples: int = 0
    correct: torch.Tensor | float = 0.0
    global_loss: torch.Tensor | float = 0.0
    batches: int = 0
    blocks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def add(self, step: StepResult, y: torch.Tensor) -> None:
        """Add one batch's results (a skipped batch adds nothing: its values are not finite)."""
        if step.skipped:
            return
        self.samples += y.shape[0]
        self.batches += 1
        if step.logits is not None:  # a pipeline stage without the head has no logits
            self.correct = self.correct + (step.logits.argmax(dim=1) == y).sum()
            self.global_loss = self.global_loss + step.global_loss
        for block, metrics in step.block_metrics.items():
            sums = self.blocks.setdefault(block, {})
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value

    def summary(self) -> dict:
        """Plain floats: accuracy, mean global loss and mean per-block metrics."""
        per_batch = max(self.batches, 1)
        return {
            "train_acc": float(self.correct) / max(self.samples, 1),
            "global_loss": float(self.global_loss) / per_batch,
            "blocks": {
                block: {key: float(value) / per_batch for key, value in sums.items()}
                for block, sums in self.blocks.items()
            },
        }


@dataclass
class StepResult:
    """What one training step produced (all detached)."""

    block_metrics: dict[str, dict[str, torch.Tensor]]
    logits: torch.Tensor | None = None
    global_loss: torch.Tensor | None = None
    # Scalars for the non-finite watch, in causal order: each block's largest absolute output,
    # its local loss and metrics, then the global loss (see :mod:`layerwise.nonfinite`).
    watched_keys: list[Key] = field(default_factory=list)
    watched_values: list[torch.Tensor] = field(default_factory=list)
    # True when an objective raised FloatingPointError (it found non-finite values itself).
    objective_failed: bool = False
    # True when the optimizers did not step (train.on_nonfinite: skip, on a non-finite batch).
    skipped: bool = False

    def watch(self, key: Key, value: torch.Tensor) -> None:
        """Record one watched scalar."""
        self.watched_keys.append(key)
        self.watched_values.append(value)

    def watched(self) -> tuple[list[Key], torch.Tensor]:
        """The watched keys and their values as one float32 tensor."""
        return self.watched_keys, torch.stack([v.to(torch.float32) for v in self.watched_values])


class Trainer:
    """Trains a :class:`~layerwise.graph.Network` with one optimizer per local block and one
    for the backprop blocks.

    ``local_optim`` and ``global_optim`` are optimizer settings as in a recipe's ``optim``
    (``{"name": "adam", "lr": 1e-3}``; defaults: Adam at 1e-3). ``on_nonfinite``, ``free_early``
    and ``precision`` are a recipe's ``train`` keys. A network that has not seen its input shape
    yet is built, and the optimizers made, on the first batch.

    ``schedule`` is a recipe's ``optim.schedule`` (``{"name": "cosine", "warmup_epochs": 2}``; default:
    constant), applied to every optimizer relative to its own lr and stepped at the end of each
    :meth:`train_epoch`; ``epochs`` is the run's length, which ``cosine`` needs (a recipe's
    ``train.epochs``). See :mod:`layerwise.schedule`.
    """

    def __init__(self, graph: Network, local_optim: OptimizerConfig | dict | None = None,
                 global_optim: OptimizerConfig | dict | None = None, *, on_nonfinite: str = "stop",
                 free_early: bool = True, precision: str = "fp32", nonfinite_check_every: int | None = None,
                 group: Group | None = None, schedule: ScheduleConfig | dict | None = None,
                 epochs: int | None = None, blocks: Sequence[str] | None = None):
        if not isinstance(graph, Network):
            raise LayerwiseError(f"Trainer: expected a layerwise.Network, found {type(graph).__name__}")
        options = build(TrainConfig, {"on_nonfinite": on_nonfinite, "free_early": free_early,
                                      "precision": precision}, "", problems := Problems())
        if problems:
            raise RecipeError("Trainer", problems.items)
        self.graph = graph
        self.group = group  # None: one process
        # A pipeline stage's blocks (layerwise.pipeline): it trains, and makes optimizers for, these only.
        self.stage = list(blocks) if blocks is not None else None
        self.local_optim = optimizer_config(local_optim, "local_optim")
        self.global_optim = optimizer_config(global_optim, "global_optim")
        self.free_early = options.free_early
        self.bf16 = options.precision == "bf16"
        self.on_nonfinite = options.on_nonfinite
        self.nonfinite_check_every = nonfinite_check_every
        self.schedule = schedule_config(schedule, epochs, {"local_optim.lr": self.local_optim.lr,
                                                           "global_optim.lr": self.global_optim.lr})
        self.epochs = epochs
        self.lr_schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.ready = False
        if graph.materialized:
            self.set_up()

    @classmethod
    def from_recipe(cls, graph: Network, recipe: Recipe, *, group: Group | None = None,
                    nonfinite_check_every: int | None = None, blocks: Sequence[str] | None = None) -> Trainer:
        """The trainer a recipe's ``optim`` and ``train`` sections describe."""
        return cls(graph, recipe.optim.local, recipe.optim.global_, on_nonfinite=recipe.train.on_nonfinite,
                   free_early=recipe.train.free_early, precision=recipe.train.precision,
                   nonfinite_check_every=nonfinite_check_every, group=group, schedule=recipe.optim.schedule,
                   epochs=recipe.train.epochs, blocks=blocks)

    def holds(self, name: str) -> bool:
        """True when this trainer trains block ``name`` (always, outside a pipeline)."""
        return self.stage is None or name in self.stage

    def set_up(self) -> None:
        """Sort the parameters by the loss that trains them and make the optimizers (once)."""
        graph, group = self.graph, self.group
        if group is not None:  # batch statistics over the global batch, before optimizers see the parameters
            use_global_batch_norm(graph, group.process_group)
        # An objective's own modules (an auxiliary head) act after the gather, on the whole batch.
        local_blocks = [block for block in graph.local_blocks() if self.holds(block.name)]
        self.objective_params = [p for block in local_blocks for p in block.objective.parameters()]
        self.num_classes = graph.num_classes
        self.local_params = {block.name: [p for p in block.parameters() if p.requires_grad] for block in local_blocks}
        self.local_optimizers = {
            name: make_optimizer(self.local_optim, params) for name, params in self.local_params.items() if params
        }
        self.global_params = graph.global_parameters(self.stage)
        self.global_optimizer = make_optimizer(self.global_optim, self.global_params) if self.global_params else None
        self.global_through = graph.global_gradient_blocks()
        if not self.schedule.is_constant:  # made after the optimizers, before any state is loaded into them
            self.lr_schedulers = {name: make_scheduler(opt, self.schedule, self.epochs)
                                  for name, opt in self.optimizers().items()}
        device = graph.device
        self.watch = NonFiniteWatch(self.on_nonfinite, device, self.explain, self.nonfinite_check_every)
        self.ready = True

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (the CPU before the first batch of a lazy network)."""
        return self.graph.device

    def prepare_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` on the network's device; a lazy network is built (and the optimizers made) here."""
        if not self.ready:
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else None
            if isinstance(x, torch.Tensor):
                self.graph.materialize(x.shape[1:], self.device, x.dtype if x.is_floating_point() else None)
            self.set_up()
        return batch_tensors(batch, self.device)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by a stable name (``global`` or ``local.<block>``), for checkpoints."""
        named = {f"local.{name}": opt for name, opt in self.local_optimizers.items()}
        if self.global_optimizer is not None:
            named["global"] = self.global_optimizer
        return named

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
        """The lr scheduler of each optimizer, by the same names as :meth:`optimizers`; none for a
        constant schedule. :meth:`train_epoch` steps them at its end."""
        return dict(self.lr_schedulers)

    def learning_rates(self) -> dict[str, float]:
        """The lr the optimizers train at now: ``local`` (every local block's) and ``global``."""
        rates = {}
        if self.local_optimizers:
            rates["local"] = next(iter(self.local_optimizers.values())).param_groups[0]["lr"]
        if self.global_optimizer is not None:
            rates["global"] = self.global_optimizer.param_groups[0]["lr"]
        return rates

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor, given: dict[str, torch.Tensor] | None = None,
                          publish: Callable[[str, torch.Tensor], None] | None = None, *,
                          streams: dict[str, torch.Tensor] | None = None) -> StepResult:
        """One forward pass; each local block's loss goes backward into its own parameters as
        soon as the block's output exists, then the global loss into the ``none`` blocks.

        Distributed, ``x`` and ``y`` are this rank's share: local losses get the global batch
        (their kernels couple every pair of samples), and gradients are summed over ranks at the end.

        In a pipeline stage, ``given`` holds the outputs of earlier stages' blocks that this
        stage reads, and ``publish(name, output)`` is called with each block output as soon as
        it exists, before its local loss, so a later stage can start on it (layerwise.pipeline).

        A network with a stream maker (layerwise.streams) carries this batch's streams (made
        here, unless ``streams`` gives them) through every block; each local objective sees its
        block's output on each stream as ``ctx.streams``, and the global loss reads the data only.
        """
        group = self.group
        x_all, y_all = (x, y) if group is None else (group.gather(x), group.gather(y))
        ctx = LossContext(x=x_all, y=y_all, num_classes=self.num_classes, kernels=KernelCache())
        result = StepResult(block_metrics={})
        if streams is None:
            streams = self.graph.make_streams(x, y)

        def train_block(name: str, block_input: torch.Tensor, z: torch.Tensor,
                        stream_outputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            if publish is not None:
                publish(name, z)
            # (torch.linalg.vector_norm(z, inf) reads the same but is 15 times slower on the CPU)
            result.watch((name, "output"), z.detach().abs().amax())
            block = self.graph.blocks[name]
            if not block.local or block.freeze:
                return z
            ctx.block_input, ctx.block, ctx.streams = block_input, block, stream_outputs or {}
            z_loss = z
            if group is not None:  # the loss sees the global batch; each rank's gradient keeps its own rows
                ctx.block_input = x_all if block_input is x else group.gather_with_grad(block_input)
                ctx.block = ShardedBlock(block, group)
                ctx.streams = {stream: group.gather_with_grad(out) for stream, out in ctx.streams.items()}
                z_loss = group.gather_with_grad(z)
            try:
                loss, metrics = block.objective.loss(z_loss, ctx)
            except FloatingPointError:
                # An objective may detect non-finite values itself (docs/plugins.md): record
                # a NaN loss for this block, so the non-finite watch names it like any other.
                metrics = {"loss": torch.full((), math.nan, device=x.device)}
                result.objective_failed = True
                loss = None
            result.block_metrics[name] = metrics
            for metric, value in metrics.items():
                result.watch((name, metric), value.detach().reshape(()))
            # The global backward later passes through z when it must; otherwise, with
            # free_early, z's graph is freed by this backward and later blocks get z detached.
            keep = name in self.global_through or not self.free_early
            if loss is not None and self.local_params[name]:
                loss.backward(inputs=self.local_params[name], retain_graph=keep)
            return z if keep else z.detach()

        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.graph.run(x, on_output=train_block, blocks=self.stage, given=given, streams=streams).logits
        if logits is None:  # a pipeline stage before the head: no global loss here
            if group is not None:
                self.sum_over_ranks(result)
            return result
        # The loss in at least float32: bf16 logits would round the cross-entropy coarsely.
        logits_float = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if group is None:
            global_loss = nn.functional.cross_entropy(logits_float, y)
        else:  # this share's part of the global mean: the parts add up over ranks
            global_loss = nn.functional.cross_entropy(logits_float, y, reduction="sum") / y_all.shape[0]
        if self.global_params:
            global_loss.backward(inputs=self.global_params)
        result.logits, result.global_loss = logits.detach(), global_loss.detach()
        result.watch(("", "global"), result.global_loss)
        if group is not None:
            self.sum_over_ranks(result)
        return result

    def sum_over_ranks(self, result: StepResult) -> None:
        """Sum every gradient, the global loss and the watched values over ranks, in one all-reduce.

        Gradients: each rank holds its term of the full gradient (see :mod:`layerwise.distributed`),
        except for objectives' own modules, whose whole gradient every rank already has: their sum
        is divided by the world size again (an average, which also keeps the ranks in step).
        Watched values: summed, a value is finite only if it is finite on every rank, so all ranks
        step, skip or stop on the same batch (values that are equal everywhere, such as the local
        losses, come out multiplied by the world size; only their finiteness is read).
        """
        params = [p for params in self.local_params.values() for p in params] + self.global_params
        grads = [p.grad for p in params if p.grad is not None]
        watched = torch.stack([v.to(torch.float32) for v in result.watched_values])
        global_loss = result.global_loss.clone() if result.global_loss is not None else None  # own dtype, for the log
        self.group.sum_([*grads, watched] + ([global_loss] if global_loss is not None else []))
        for p in self.objective_params:
            if p.grad is not None:
                p.grad.div_(self.group.world)
        result.watched_values = list(watched.unbind())
        result.global_loss = global_loss  # the mean over the global batch

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One training step on a batch; a non-finite batch stops training or, with
        ``train.on_nonfinite: skip``, leaves every optimizer unstepped (see :mod:`layerwise.nonfinite`)."""
        return self.step_on_device(*self.prepare_batch((x, y)))

    def step_on_device(self, x: torch.Tensor, y: torch.Tensor, given: dict[str, torch.Tensor] | None = None,
                       publish: Callable[[str, torch.Tensor], None] | None = None) -> StepResult:
        """:meth:`step` on a batch that :meth:`prepare_batch` has already checked and moved
        (``given`` and ``publish``: a pipeline stage's, see :meth:`compute_gradients`)."""
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)
        result = self.compute_gradients(x, y, given, publish)
        keys, values = result.watched()
        if not self.watch.allows_step(keys, values, now=result.objective_failed):
            result.skipped = True
            return result
        for opt in self.optimizers().values():
            opt.step()
        return result

    def explain(self, key: Key, values: dict[Key, float]) -> tuple[str, str]:
        """What the first non-finite watched value is, and the setting that most plausibly caused
        it, judged from every value watched on that batch (see :mod:`layerwise.nonfinite`)."""
        block_name, metric = key
        blown = self.first_blown_up_block(values)
        if not block_name:
            what = f"the global cross-entropy at the head '{self.graph.head}'"
            return what, self.blow_up_cause(blown, values) if blown else self.lr_cause(self.graph.head)
        objective = self.graph.blocks[block_name].objective
        who = f"block '{block_name}' (objective {objective.name})"
        what = f"the output of {who}" if metric == "output" else f"{metric} of {who}"
        if metric == "output" or not objective.local:
            return what, self.lr_cause(block_name)
        if blown is not None and self.graph.order.index(blown) <= self.graph.order.index(block_name):
            return what, self.blow_up_cause(blown, values)
        terms = {m: v for (b, m), v in values.items() if b == block_name and m not in ("output", metric)}
        if metric == "loss" and terms and all(math.isfinite(v) for v in terms.values()):
            return what, loss_weight_cause(objective, terms)
        return what, objective.nonfinite_hint()

    def first_blown_up_block(self, values: dict[Key, float]) -> str | None:
        """The first block (in evaluation order) whose output was non-finite or beyond
        :data:`BLOWN_UP`: where values started to explode, whatever later became NaN."""
        for name in self.graph.order:
            top = values.get((name, "output"))
            if top is not None and not abs(top) < BLOWN_UP:
                return name
        return None

    def blow_up_cause(self, block_name: str, values: dict[Key, float]) -> str:
        """The cause when ``block_name``'s output exploded first."""
        return (f"the output of block '{block_name}' had already reached {values[(block_name, 'output')]:.3g} "
                f"(healthy activations stay far below {BLOWN_UP:.0e}); {self.lr_cause(block_name)}")

    def lr_cause(self, block_name: str) -> str:
        """The learning rate that trains ``block_name``, named with its recipe key and value."""
        block = self.graph.blocks[block_name]
        key, config = ("optim.local", self.local_optim) if block.local else ("optim.global", self.global_optim)
        kind = "its local objective's" if block.local else "the backprop blocks'"
        return (f"a learning rate too high for {kind} optimizer: {key}.lr = {config.lr:g} ({config.name}); "
                f"lower it")

    def train_epoch(
        self,
        batches,
        on_batch: Callable[[], None] | None = None,
        epoch: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        step: Callable[[torch.Tensor, torch.Tensor], StepResult] | None = None,
    ) -> dict:
        """Train on every batch of ``batches`` (any iterable of ``(x, y)``, such as a DataLoader, or
        of ``(x, y, idx)``); return the epoch's summary: training accuracy, mean global loss, and
        each local block's mean metrics.

        ``should_stop`` is asked before each batch; when it says yes, :class:`TrainingInterrupted`
        is raised at that batch boundary (Ctrl-C). ``epoch`` labels error messages.

        With a schedule (not constant), the summary holds the epoch's learning rates as ``lr``
        (:meth:`learning_rates`), and the schedulers then step to the next epoch's.

        ``step(x, y)`` trains one prepared batch (default :meth:`step_on_device`); a pipeline
        stage passes one that also receives and sends activations.
        """
        step = step or self.step_on_device
        self.graph.train()
        if not self.ready:  # the watch exists once the network is built, on the first batch
            batches = iter(batches)
            first = next(batches, None)
            if first is None:
                raise LayerwiseError("train_epoch: the batches are empty")
            self.prepare_batch(first)
            batches = itertools.chain([first], batches)
        self.watch.start_epoch(epoch)
        totals = EpochTotals()
        done = 0
        for batch in batches:
            if should_stop is not None and should_stop():
                raise TrainingInterrupted(f"stopped after batch {done} of epoch {epoch}")
            x, y = self.prepare_batch(batch)
            try:
                totals.add(step(x, y), y)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                global_batch = x.shape[0] * (self.group.world if self.group is not None else 1)
                raise LayerwiseError(out_of_memory_message(global_batch, x.device)) from None
            done += 1
            if on_batch is not None:
                on_batch()
        self.watch.finish_epoch(done)
        if self.group is not None:  # accuracy over the global batch: every shard's counts
            counts = torch.tensor([float(totals.correct), float(totals.samples)], dtype=torch.float64,
                                  device=self.group.device)
            self.group.sum_([counts])
            totals.correct, totals.samples = counts[0], int(counts[1])
        summary = totals.summary()
        if self.watch.mode == "skip":
            summary["skipped_batches"] = self.watch.skipped
        if self.lr_schedulers:
            summary["lr"] = self.learning_rates()
            for scheduler in self.lr_schedulers.values():
                scheduler.step()
        return summary


@torch.no_grad()
def evaluate(graph: Network, batches, on_batch: Callable[[], None] | None = None) -> dict:
    """Accuracy and mean cross-entropy of the head over ``batches`` (``(x, y)`` or ``(x, y, idx)``)."""
    graph.eval()
    correct: torch.Tensor | int = 0  # sums stay on the model's device: one host read at the end
    loss_sum: torch.Tensor | float = 0.0
    samples = 0
    device = graph.device
    for batch in batches:
        x, y = batch_tensors(batch, device)
        logits = graph(x)
        correct = correct + (logits.argmax(dim=1) == y).sum()
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss_sum = loss_sum + nn.functional.cross_entropy(logits, y, reduction="sum")
        samples += y.shape[0]
        if on_batch is not None:
            on_batch()
    if not samples:
        raise LayerwiseError("nothing to evaluate: the batches are empty")
    return {"acc": int(correct) / samples, "loss": float(loss_sum) / samples}
