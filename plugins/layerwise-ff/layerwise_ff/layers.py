"""``fflinear``: a linear layer on the length-normalised input, FF's normalisation between layers.

Hinton (2022, section 2.1) normalises the length of each layer's input before it enters the
layer: the previous layer's goodness (its squared length) is then invisible to the next one,
which must find new features rather than re-read how confident the layer below was.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layerwise.errors import LayerwiseError


class LengthNorm(nn.Module):
    """Divide each sample, flattened, by its Euclidean length (plus a small epsilon)."""

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return flat / (flat.norm(dim=1, keepdim=True) + self.eps)


def fflinear(cfg, in_shape):
    """Flatten, length-normalise, then ``nn.Linear(features, cfg.out)``; the block adds ``act``."""
    if cfg.out is None:
        raise LayerwiseError("layer fflinear needs out (its width)")
    return nn.Sequential(LengthNorm(), nn.Linear(math.prod(in_shape), cfg.out))
