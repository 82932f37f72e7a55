"""``simmatch``: a block learns to make same-class samples alike and other-class samples not.

Paper: Nøkland, Eidnes, "Training Neural Networks with Local Error Signals", ICML 2019.

For a batch of ``m`` samples, the similarity matrix of features ``A`` (one row per sample,
flattened) is the ``m x m`` matrix of cosine similarities between rows. With ``center`` each
row first has its own mean removed, which makes the entries correlations (the paper's
"adjusted cosine similarity"). For the block's output ``z`` and one-hot labels ``Y``, the
"sim" loss is

    sim = mean((S(z) - S(Y))^2)

``S(Y)`` is 1 for two samples of the same class and a fixed negative value (``-1/(k-1)`` with
``k`` classes, centred) otherwise, so the block is pushed to map each class to its own
direction; nothing but the similarity structure is asked for, so no helper module is needed.

``pred_weight > 0`` adds the cross-entropy of a linear auxiliary classifier on ``z`` (the
paper's "pred" loss) and gives "predsim":

    loss = sim + pred_weight * cross_entropy(W z + b, y)

The paper weighs the two as ``(1 - beta) pred + beta sim`` with ``beta = 0.99``, which is this
loss scaled by ``beta`` with ``pred_weight = (1 - beta) / beta ~ 0.0101``. The paper also
passes conv outputs through an extra 3x3 convolution before ``S``; here ``S`` always reads
the flattened output, the form it uses for fully connected layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from layerwise.objectives.base import BlockInfo, LossContext, Objective


@dataclass
class SimMatchConfig:
    """Options of ``simmatch``."""

    # Weight of the auxiliary cross-entropy ("pred"); 0 gives the pure "sim" loss and no helper module.
    pred_weight: float = 0.0
    # Remove each sample's mean over its features before the cosine, as the paper does.
    center: bool = True

    def __post_build__(self, path: str, problems) -> None:
        """A negative weight would reward misclassification."""
        if self.pred_weight < 0:
            problems.add(f"{path}.pred_weight", f"must be >= 0, found {self.pred_weight}")


def similarity_matrix(features: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Cosine similarities between the rows of ``features`` (flattened after the batch axis)."""
    rows = features.flatten(1)
    if center:
        rows = rows - rows.mean(dim=1, keepdim=True)
    # eps keeps an all-zero row (a dead ReLU layer) at similarity 0 instead of NaN.
    unit = nn.functional.normalize(rows, dim=1, eps=1e-8)
    return unit @ unit.T


class SimMatch(Objective):
    """``simmatch``: match the output's similarity matrix to the labels' ("sim"), plus optional "pred"."""

    name = "simmatch"
    Config = SimMatchConfig

    def __init__(self, config: SimMatchConfig, info: BlockInfo):
        super().__init__(config, info)
        # Only predsim owns parameters: a head that no loss used would never train.
        self.head = nn.Linear(math.prod(info.out_shape), info.num_classes) if config.pred_weight > 0 else None

    def loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sim loss, plus ``pred_weight`` times the auxiliary cross-entropy when it is set."""
        cfg: SimMatchConfig = self.config
        # Every block of the batch compares with the same label similarities: compute them once.
        target = ctx.kernels.get(("simmatch-labels", cfg.center, z.dtype),
                                 lambda: similarity_matrix(ctx.y_onehot().to(z.dtype), cfg.center))
        sim = nn.functional.mse_loss(similarity_matrix(z, cfg.center), target)
        metrics = {"sim": sim.detach()}
        loss = sim
        if self.head is not None:
            logits = self.head(z.flatten(1))
            pred = nn.functional.cross_entropy(logits, ctx.y)
            loss = sim + cfg.pred_weight * pred
            metrics["pred"] = pred.detach()
            metrics["acc"] = (logits.argmax(dim=1) == ctx.y).to(logits.dtype).mean().detach()
        metrics["loss"] = loss.detach()
        return loss, metrics
