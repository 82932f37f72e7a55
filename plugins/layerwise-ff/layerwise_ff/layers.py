"""``fflinear``: a linear layer on the RMS-normalised input, FF's normalisation between layers.

Hinton (2022, section 2.1) normalises the length of each layer's input before it enters the
layer: the previous layer's goodness (its squared length) is then invisible to the next one,
which must find new features rather than re-read how confident the layer below was.

Only the direction matters to FF, so the length chosen is a matter of scale, and the scale
matters a great deal: we normalise to a root mean square of 1 (a length of the square root of
the width), not to a length of 1. With unit length, each input value is about ``1/sqrt(width)``,
the default initialisation gives pre-activations a few hundred times too small for the goodness
to reach its threshold, and the cheapest way down the loss is to raise every bias until the
goodness sits at the threshold for positive and negative data alike: on MNIST such a network
still predicted below chance after a few epochs, where RMS normalisation learns from the first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layerwise.errors import LayerwiseError


class RootMeanSquareNorm(nn.Module):
    """Divide each sample, flattened, by its root mean square (plus a small epsilon).

    Not ``torch.nn.RMSNorm``: that one adds its epsilon inside the square root and needs the
    normalised shape up front; this one's numbers are the ones docs/results.md measured."""

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return flat / (flat.pow(2).mean(dim=1, keepdim=True).sqrt() + self.eps)


def fflinear(cfg, in_shape):
    """Flatten, normalise to a root mean square of 1, then ``nn.Linear(features, cfg.out)``; the block adds ``act``."""
    if cfg.out is None:
        raise LayerwiseError("layer fflinear needs out (its width)")
    return nn.Sequential(RootMeanSquareNorm(), nn.Linear(math.prod(in_shape), cfg.out))
