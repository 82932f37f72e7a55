"""``sigprop``: Signal Propagation (Kohan, Rietman, Siegelmann, IEEE TNNLS 2023).

The label's *signal* (the ``sigprop`` stream, :mod:`layerwise_sigprop.streams`) travels through
the same layers as the data; each layer learns to make its output ``z`` on a data sample close to
its output ``s`` on that sample's class signal, with one of the paper's two kinds of loss:

- ``l2``: the mean squared distance between ``z`` and ``s`` (``mse_loss``, averaged over the
  batch and the features). Nothing keeps the layer from mapping everything to one point, so
  this loss alone may collapse; ``sim`` is the contrastive choice.
- ``sim``: a contrastive cross-entropy over the batch. With ``z`` and ``s`` flattened and
  L2-normalised, ``logits[i, j] = <z_i, s_j> / temperature``; the target of row ``i`` spreads
  its mass evenly over the samples ``j`` of the same class as ``i``
  (``targets = same / same.sum(1)``), and ``loss = -(targets * log_softmax(logits)).sum(1).mean()``:
  close to its own class's signal, far from the other classes' signals in the batch.

Both read only ``z`` and ``ctx.streams["signal"]``, this block's outputs on the data and on the
signal; the network feeds each stream into every block detached, so the loss trains this block's
parameters only. The metric ``acc`` is how often a sample's most similar signal in the batch (by
the loss's own measure) is of its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from layerwise.objectives.base import LossContext, Objective
from layerwise_sigprop.streams import SigpropStreams


@dataclass
class SigpropConfig:
    """Options of ``sigprop``."""

    # l2: mean squared distance to the own class's signal output (may collapse); sim: contrastive
    # cross-entropy over the batch's signal outputs.
    loss: Literal["l2", "sim"] = "sim"
    # Temperature of the sim loss's softmax over cosine similarities (ignored by l2); 0.1 is the
    # usual contrastive value, not a setting from the paper.
    temperature: float = 0.1

    def __post_build__(self, path: str, problems) -> None:
        """The temperature must be positive."""
        if self.temperature <= 0:
            problems.add(f"{path}.temperature", f"must be > 0, found {self.temperature}")


class SignalPropagation(Objective):
    """``sigprop``: the data's output close to its class signal's output (``l2``), or contrastively (``sim``)."""

    name = "sigprop"
    Config = SigpropConfig
    streams = SigpropStreams

    def loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The l2 or sim loss between ``z`` and the signal's output ``ctx.streams['signal']``."""
        signal = ctx.streams["signal"]
        data, sig = z.flatten(1), signal.flatten(1)
        same = (ctx.y[:, None] == ctx.y[None, :]).to(data.dtype)
        if self.config.loss == "l2":
            loss = nn.functional.mse_loss(z, signal)
            scores = -torch.cdist(data.detach(), sig.detach())
        else:
            logits = nn.functional.normalize(data, dim=1) @ nn.functional.normalize(sig, dim=1).T
            logits = logits / self.config.temperature
            targets = same / same.sum(dim=1, keepdim=True)
            loss = -(targets * nn.functional.log_softmax(logits, dim=1)).sum(dim=1).mean()
            scores = logits.detach()
        hit = same.gather(1, scores.argmax(dim=1, keepdim=True)).mean()
        return loss, {"loss": loss.detach(), "acc": hit.detach()}
