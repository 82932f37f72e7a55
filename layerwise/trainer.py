"""The trainer: one forward pass per batch, and each loss routed to the parameters it may train.

Routing (DESIGN.md section 2):
1. a local objective's loss reaches only its own block (and the objective's helper modules):
   ``loss.backward(inputs=block_params)``;
2. the global cross-entropy reaches only unfrozen ``none`` blocks:
   ``global_loss.backward(inputs=global_params)``;
3. the global gradient still flows *through* local blocks to earlier ``none`` blocks, unless a
   block sets ``detach: true``;
4. frozen blocks get no optimizer and no gradient.
Optimizers are built once and persist across batches, so momentum is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.graph import Graph, GraphOutput
from layerwise.objectives.base import KernelCache, LossContext
from layerwise.recipe import OptimizerConfig, Recipe


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LayerwiseError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


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

    def add(self, step: "StepResult", y: torch.Tensor) -> None:
        """Add one batch's results."""
        self.samples += y.shape[0]
        self.batches += 1
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

    logits: torch.Tensor
    global_loss: torch.Tensor
    block_metrics: dict[str, dict[str, torch.Tensor]]


class Trainer:
    """Trains a :class:`Graph` with one optimizer per local block and one for the rest."""

    def __init__(self, graph: Graph, recipe: Recipe, num_classes: int):
        self.graph = graph
        self.num_classes = num_classes
        self.local_params = {
            block.config.name: [p for p in block.parameters() if p.requires_grad] for block in graph.local_blocks()
        }
        self.local_optimizers = {
            name: make_optimizer(recipe.optim.local, params) for name, params in self.local_params.items() if params
        }
        self.global_params = graph.global_parameters()
        self.global_optimizer = make_optimizer(recipe.optim.global_, self.global_params) if self.global_params else None

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by a stable name (``global`` or ``local.<block>``), for checkpoints."""
        named = {f"local.{name}": opt for name, opt in self.local_optimizers.items()}
        if self.global_optimizer is not None:
            named["global"] = self.global_optimizer
        return named

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[GraphOutput, StepResult]:
        """One forward pass, then each loss's backward into exactly the parameters it may train."""
        out = self.graph(x)
        ctx = LossContext(x=x, y=y, num_classes=self.num_classes, kernels=KernelCache())
        block_metrics: dict[str, dict[str, torch.Tensor]] = {}
        for block in self.graph.local_blocks():
            name = block.config.name
            ctx.block_input = out.inputs[name]
            loss, metrics = block.objective.loss(out.outputs[name], ctx)
            block_metrics[name] = metrics
            if self.local_params[name]:
                # retain_graph: the global loss below runs backward through the same graph.
                loss.backward(inputs=self.local_params[name], retain_graph=True)
        global_loss = nn.functional.cross_entropy(out.logits, y)
        if self.global_params:
            global_loss.backward(inputs=self.global_params)
        return out, StepResult(out.logits.detach(), global_loss.detach(), block_metrics)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One training step on a batch."""
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)
        _, result = self.compute_gradients(x, y)
        for opt in self.optimizers().values():
            opt.step()
        return result

    def train_epoch(self, batches, on_batch: Callable[[], None] | None = None) -> dict:
        """Train on every batch of ``batches`` (yielding ``(x, y, idx)``); return the epoch's summary."""
        self.graph.train()
        totals = EpochTotals()
        for x, y, _ in batches:
            totals.add(self.step(x, y), y)
            if on_batch is not None:
                on_batch()
        summary = totals.summary()
        check_finite(summary)
        return summary


def check_finite(summary: dict) -> None:
    """Stop with a useful message when a loss has become NaN or infinite."""
    for block, metrics in summary["blocks"].items():
        for key, value in metrics.items():
            if not torch.isfinite(torch.tensor(value)):
                raise LayerwiseError(
                    f"block '{block}': {key} became {value}; a kernel sigma too small for the layer width "
                    f"or a learning rate too high are the usual causes"
                )
    if not torch.isfinite(torch.tensor(summary["global_loss"])):
        raise LayerwiseError("the global cross-entropy became non-finite; try a lower optim.global.lr")


@torch.no_grad()
def evaluate(graph: Graph, batches, on_batch: Callable[[], None] | None = None) -> dict:
    """Accuracy and mean cross-entropy of the head over ``batches``."""
    graph.eval()
    correct = torch.zeros((), dtype=torch.long)
    loss_sum = torch.zeros(())
    samples = 0
    for x, y, _ in batches:
        logits = graph(x).logits
        correct = correct + (logits.argmax(dim=1) == y).sum().cpu()
        loss_sum = loss_sum + nn.functional.cross_entropy(logits, y, reduction="sum").cpu()
        samples += y.shape[0]
        if on_batch is not None:
            on_batch()
    return {"acc": int(correct) / max(samples, 1), "loss": float(loss_sum) / max(samples, 1)}
