"""``localce``: each block learns to be linearly classifiable, by its own auxiliary classifier.

Papers:
- Belilovsky, Eickenberg, Oyallon, "Decoupled Greedy Learning of CNNs", ICML 2020: every
  block has an auxiliary network and is trained by the cross-entropy of that network only.
- Nøkland, Eidnes, "Training Neural Networks with Local Error Signals", ICML 2019: the same
  loss, there called "pred".

For a block with output ``z`` (batch first) the auxiliary head ``g`` maps ``z`` to class
scores and

    loss = cross_entropy(g(z), y)

trains the block and ``g`` together; ``g`` is a helper module of the objective, so the
block's optimizer updates it, and it is thrown away after training (the network's own head
makes the predictions). ``g`` is:

- ``pool``: for image-shaped outputs ``(C, H, W)``, an adaptive average pool to
  ``pool x pool`` first (Belilovsky et al. and Nøkland & Eidnes both pool before the auxiliary
  classifier, which keeps it small on wide feature maps); 0 keeps every feature;
- ``hidden``: 0 for a linear classifier (the papers' simplest auxiliary), or the width of one
  ReLU hidden layer, a stronger auxiliary that lets the block keep more than linearly
  separable information.

The logged ``acc`` is the auxiliary head's training accuracy: how linearly classifiable the
block's output already is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from layerwise.objectives.base import BlockInfo, LossContext, Objective


@dataclass
class LocalCEConfig:
    """Options of ``localce``."""

    # Width of a ReLU hidden layer in the auxiliary head; 0 makes it linear, as in the papers' base case.
    hidden: int = 0
    # Side of the adaptive average pool applied to (C, H, W) outputs; 0 disables it. Ignored for flat outputs.
    pool: int = 0

    def __post_build__(self, path: str, problems) -> None:
        """Widths and pool sizes cannot be negative."""
        for key in ("hidden", "pool"):
            value = getattr(self, key)
            if value < 0:
                problems.add(f"{path}.{key}", f"must be >= 0, found {value}")


def auxiliary_head(out_shape: tuple[int, ...], num_classes: int, cfg: LocalCEConfig) -> nn.Sequential:
    """The auxiliary classifier for a block output of shape ``out_shape`` (batch excluded)."""
    layers: list[nn.Module] = []
    shape = out_shape
    if cfg.pool and len(out_shape) == 3:
        layers.append(nn.AdaptiveAvgPool2d(cfg.pool))
        shape = (out_shape[0], cfg.pool, cfg.pool)
    layers.append(nn.Flatten())
    width = math.prod(shape)
    if cfg.hidden:
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LocalCE(Objective):
    """``localce``: cross-entropy of an auxiliary classifier on the block's output."""

    name = "localce"
    Config = LocalCEConfig

    def __init__(self, config: LocalCEConfig, info: BlockInfo):
        super().__init__(config, info)
        self.head = auxiliary_head(info.out_shape, info.num_classes, config)

    def loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of the auxiliary head, and its accuracy on the batch."""
        logits = self.head(z)
        loss = nn.functional.cross_entropy(logits, ctx.y)
        accuracy = (logits.argmax(dim=1) == ctx.y).to(logits.dtype).mean()
        return loss, {"loss": loss.detach(), "acc": accuracy.detach()}
