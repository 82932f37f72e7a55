"""``ff``: Forward-Forward (Hinton, "The Forward-Forward Algorithm", 2022).

Each layer has a *goodness*, the sum of its squared activations, and learns to make it high
on positive data (the image with its true label written in) and low on negative data (with a
wrong label): with ``g`` the goodness per unit (the sum divided by the width, so that one
threshold fits every width) and ``theta`` the threshold,

    loss = softplus(sharpness * (theta - g_pos)) + softplus(sharpness * (g_neg - theta)),

averaged over the batch: the logistic loss of ``sigmoid(g - theta)`` being the probability that
the data is positive (``loss: logistic``). ``loss: symba`` is the symmetric loss of Lee and Song
(2023, "SymBa"), ``softplus(sharpness * (g_neg - g_pos))`` on each pair of a positive and its
negative: it rewards only the gap between them, so it has no threshold for the biases to reach
without looking at the label, and it learns faster (their recommended sharpness is 4).

The positive and negative data are the ``ff`` streams (:mod:`layerwise_ff.streams`), which the
network carries through every layer; the data stream (the plain image) trains only the optional
linear head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from layerwise.objectives.base import BlockInfo, LossContext, Objective
from layerwise_ff.streams import FFStreams


@dataclass
class FFConfig:
    """Options of ``ff``."""

    # logistic: Hinton's loss, each stream against the threshold; symba: the positive's goodness
    # against its own negative's (the threshold is then unused).
    loss: Literal["logistic", "symba"] = "logistic"
    # Goodness per unit that separates positive from negative data; 2.0 is the value of the
    # widely used PyTorch reproduction (mohammadpz/pytorch_forward_forward) for mean squares.
    threshold: float = 2.0
    # Slope of the logistic loss (around the threshold, or around a zero gap with symba); 1 is
    # Hinton's plain logistic, 4 is SymBa's choice.
    sharpness: float = 1.0

    def __post_build__(self, path: str, problems) -> None:
        """Both must be positive."""
        for key in ("threshold", "sharpness"):
            value = getattr(self, key)
            if value <= 0:
                problems.add(f"{path}.{key}", f"must be > 0, found {value}")


class ForwardForward(Objective):
    """``ff``: high goodness on the positive stream, low on the negative one."""

    name = "ff"
    Config = FFConfig
    streams = FFStreams

    def __init__(self, config: FFConfig, info: BlockInfo):
        super().__init__(config, info)
        self.width = math.prod(info.out_shape)

    def goodness(self, z: torch.Tensor) -> torch.Tensor:
        """``(batch,)``: the sum of squared activations of each sample."""
        return z.flatten(1).pow(2).sum(dim=1)

    def loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Positive goodness above the threshold and negative below it (logistic), or above its
        negative's (symba)."""
        cfg = self.config
        pos = self.goodness(ctx.streams["pos"]) / self.width
        neg = self.goodness(ctx.streams["neg"]) / self.width
        if cfg.loss == "symba":
            loss = nn.functional.softplus(cfg.sharpness * (neg - pos)).mean()
        else:
            loss = (nn.functional.softplus(cfg.sharpness * (cfg.threshold - pos))
                    + nn.functional.softplus(cfg.sharpness * (neg - cfg.threshold))).mean()
        separated = (pos > neg).to(pos.dtype).mean()  # how often the true label wins over the negative
        return loss, {"loss": loss.detach(), "pos": pos.mean().detach(), "neg": neg.mean().detach(),
                      "acc": separated.detach()}
