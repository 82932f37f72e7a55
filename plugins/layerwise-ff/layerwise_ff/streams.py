"""The ``ff`` stream maker: Forward-Forward's positive and negative data, and its prediction.

Hinton (2022, section 3.3) trains on MNIST with the label written into the image: the first 10
pixels are replaced by a one-hot code of a label. The *positive* stream carries the true label,
the *negative* one a wrong label, and every layer learns high goodness on the first and low on
the second (the ``ff`` objective). Negative labels are ``random`` (uniform over the wrong ones)
or ``hardest``: the wrong label to which the current network gives the most goodness, which
costs one extra pass per class and batch, without gradient.

The network then predicts by running the image once with each label written in and picking the
label with the highest goodness accumulated over the ``ff`` layers (``predict: goodness``; the
first layer left out, as Hinton does, when there are several), or by the network's head
(``predict: head``), a linear classifier on detached features in the shipped recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from layerwise.streams import StreamMaker


@dataclass
class FFStreamsConfig:
    """Options of the ``ff`` streams."""

    # How negative labels are drawn: random wrong labels (Hinton's base case), or the wrong label
    # the network currently likes best (his "hard negatives"), one extra pass per class.
    negatives: Literal["random", "hardest"] = "random"
    # How the network predicts at test time: by the label of highest accumulated goodness (FF's
    # own rule), or by the network's head block.
    predict: Literal["goodness", "head"] = "goodness"
    # Leave the first ff layer out of the accumulated goodness (Hinton: it mostly sees the label
    # pixels); ignored with a single ff layer.
    skip_first: bool = True
    # The value written at the label's pixel; null writes the batch's largest input value, so the
    # label is as bright as the brightest stroke whatever the normalisation.
    label_value: float | None = None


def embed(x: torch.Tensor, labels: torch.Tensor, num_classes: int, value: float | None) -> torch.Tensor:
    """``x`` with its first ``num_classes`` values (flattened) replaced by the one-hot code of ``labels``."""
    flat = x.flatten(1).clone()
    high = flat.max() if value is None else torch.tensor(value, dtype=x.dtype, device=x.device)
    flat[:, :num_classes] = nn.functional.one_hot(labels, num_classes).to(x.dtype) * high
    return flat.view_as(x)


class FFStreams(StreamMaker):
    """``pos``: the input with its true label written in; ``neg``: with a wrong one."""

    name = "ff"
    Config = FFStreamsConfig
    names = ("pos", "neg")

    def make(self, x, y, network):
        classes = self.info.num_classes
        if self.config.negatives == "hardest":
            scores = self.goodness_per_label(network, x)
            scores[torch.arange(len(y), device=y.device), y] = -torch.inf
            wrong = scores.argmax(dim=1)
        else:
            wrong = (y + torch.randint(1, classes, y.shape, device=y.device)) % classes
        return {"pos": embed(x, y, classes, self.config.label_value),
                "neg": embed(x, wrong, classes, self.config.label_value)}

    def predict(self, network, x):
        if self.config.predict == "head":
            return None
        return self.goodness_per_label(network, x)

    def goodness_per_label(self, network, x: torch.Tensor) -> torch.Tensor:
        """``(batch, classes)``: the goodness summed over the ``ff`` layers with each label written in."""
        layers = [name for name in network.order if hasattr(network.blocks[name].objective, "goodness")]
        if self.config.skip_first and len(layers) > 1:
            layers = layers[1:]
        scores = []
        with torch.no_grad():
            for label in range(self.info.num_classes):
                labels = torch.full((x.shape[0],), label, dtype=torch.int64, device=x.device)
                out = network.run(embed(x, labels, self.info.num_classes, self.config.label_value))
                scores.append(sum(network.blocks[name].objective.goodness(out.outputs[name]) for name in layers))
        return torch.stack(scores, dim=1)
