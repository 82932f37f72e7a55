"""The ``sigprop`` stream maker: Signal Propagation's label signal, and its prediction rule.

Kohan, Rietman and Siegelmann ("Signal Propagation: The Framework for Learning and Inference in
a Forward Pass", IEEE TNNLS 2023) turn the label into a *signal* shaped like the input, which
travels forward through the same layers as the data; every layer learns, locally, to bring the
data's output close to the output of its own class's signal (the ``sigprop`` objective).

Here the one stream, ``signal``, is each sample's one-hot label mapped into the input space by a
projection ``(num_classes, input_features)``. **Difference from the paper**: the paper *learns*
this projection (its first layer for the target); stream makers have no optimizer, so here it is
a fixed random buffer drawn from option ``seed`` (a private generator: the run's random stream
is untouched), each row standardised (mean 0, std 1) and then scaled to the batch's input
statistics: ``signal = x.mean() + x.std() * projection[y]``, so the signal is as bright as the
data whatever the normalisation. The buffer lives in the network, so checkpoints hold it.

Prediction: by the network's head (``predict: head``, a linear classifier on detached features
in the shipped recipes), or by the signals (``predict: signal``): every class's signal goes
through the network once (without gradient), and each sample is scored by its similarity, at the
last block whose objective reads these streams, to each class signal's output there: the
negative Euclidean distance or the cosine similarity (``score``; ``auto`` follows that block's
``sigprop`` loss: cosine for ``sim``, distance for ``l2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.streams import StreamInfo, StreamMaker


@dataclass
class SigpropStreamsConfig:
    """Options of the ``sigprop`` streams."""

    # Seed of the fixed random label projection (the paper learns it; see the module docstring).
    seed: int = 0
    # How the network predicts at test time: by its head block, or by the nearest class signal.
    predict: Literal["head", "signal"] = "head"
    # With predict: signal, the similarity to each class signal's output: negative Euclidean
    # distance, cosine similarity, or auto (cosine if the scoring block's loss is sim, else distance).
    score: Literal["auto", "distance", "cosine"] = "auto"


def projection(num_classes: int, features: int, seed: int) -> torch.Tensor:
    """``(num_classes, features)``: seeded standard normal rows, each standardised to mean 0, std 1."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_classes, features, generator=gen)
    if features > 1:
        rows = (rows - rows.mean(dim=1, keepdim=True)) / rows.std(dim=1, correction=0, keepdim=True)
    return rows


class SigpropStreams(StreamMaker):
    """``signal``: each sample's class signal, its one-hot label projected into the input space."""

    name = "sigprop"
    Config = SigpropStreamsConfig
    names = ("signal",)

    def __init__(self, config: SigpropStreamsConfig, info: StreamInfo):
        super().__init__(config, info)
        self.register_buffer("projection", projection(info.num_classes, math.prod(info.input_shape), config.seed))

    def class_signals(self, x: torch.Tensor) -> torch.Tensor:
        """``(num_classes, *input_shape)``: every class's signal, scaled to the statistics of batch ``x``."""
        std = x.std(correction=0) if x.numel() > 1 else torch.ones((), dtype=x.dtype, device=x.device)
        signals = x.mean() + std * self.projection.to(device=x.device, dtype=x.dtype)
        return signals.view(self.info.num_classes, *x.shape[1:])

    def make(self, x, y, network):
        return {"signal": self.class_signals(x)[y]}

    def predict(self, network, x):
        if self.config.predict == "head":
            return None
        return self.signal_scores(network, x)

    def scoring_block(self, network) -> str:
        """The last block whose objective reads these streams (its output is compared)."""
        readers = [name for name in network.order
                   if getattr(getattr(network.blocks[name], "objective", None), "streams", None) is type(self)]
        if not readers:
            raise LayerwiseError("stream maker 'sigprop': predict: signal needs a block whose objective reads the "
                                 "sigprop streams (objective: sigprop)")
        return readers[-1]

    def signal_scores(self, network, x: torch.Tensor) -> torch.Tensor:
        """``(batch, num_classes)``: each sample's similarity to every class signal at the scoring block."""
        block = self.scoring_block(network)
        score = self.config.score
        if score == "auto":
            loss = getattr(getattr(network.blocks[block].objective, "config", None), "loss", "l2")
            score = "cosine" if loss == "sim" else "distance"
        with torch.no_grad():
            data = network.run(x).outputs[block].flatten(1)
            signals = network.run(self.class_signals(x)).outputs[block].flatten(1)
        if score == "cosine":
            return nn.functional.normalize(data, dim=1) @ nn.functional.normalize(signals, dim=1).T
        return -torch.cdist(data, signals)
