"""Built-in layer builders: ``builder(block_config, in_shape) -> nn.Module``, and
:func:`build_body`, which turns a recipe block into its module (layer, batch-norm, activation).

``in_shape`` excludes the batch dimension and comes from the data, so recipes state only
output widths. A builder raises :class:`LayerwiseError` when the input cannot feed it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.graph import dry_run
from layerwise.recipe import BlockConfig

LayerBuilder = Callable[[BlockConfig, tuple], nn.Module]

ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def require_out(cfg: BlockConfig) -> int:
    """The block's output width; layers with weights must state it."""
    if cfg.out is None:
        raise LayerwiseError(f"layer '{cfg.layer}' needs 'out', the number of output features or channels")
    return cfg.out


def require_image(cfg: BlockConfig, in_shape: tuple) -> tuple[int, int, int]:
    """The (C, H, W) input of a 2-d layer, or an error saying what arrived instead."""
    if len(in_shape) != 3:
        raise LayerwiseError(f"layer '{cfg.layer}' needs an image input (C, H, W), found shape {in_shape}")
    return in_shape


def linear(cfg: BlockConfig, in_shape: tuple) -> nn.Module:
    """Fully connected; an image input is flattened first."""
    layer = nn.Linear(math.prod(in_shape), require_out(cfg))
    return nn.Sequential(nn.Flatten(), layer) if len(in_shape) > 1 else layer


def conv2d(cfg: BlockConfig, in_shape: tuple) -> nn.Module:
    """2-d convolution; stride defaults to 1."""
    channels = require_image(cfg, in_shape)[0]
    return nn.Conv2d(channels, require_out(cfg), cfg.kernel_size, stride=cfg.stride or 1, padding=cfg.padding)


def maxpool(cfg: BlockConfig, in_shape: tuple) -> nn.Module:
    """Max pooling; stride defaults to the window size."""
    require_image(cfg, in_shape)
    return nn.MaxPool2d(cfg.kernel_size, stride=cfg.stride, padding=cfg.padding)


def avgpool(cfg: BlockConfig, in_shape: tuple) -> nn.Module:
    """Average pooling; stride defaults to the window size."""
    require_image(cfg, in_shape)
    return nn.AvgPool2d(cfg.kernel_size, stride=cfg.stride, padding=cfg.padding)


def flatten(cfg: BlockConfig, in_shape: tuple) -> nn.Module:
    """Flatten everything but the batch dimension."""
    return nn.Flatten()


def batchnorm(cfg: BlockConfig, in_shape: tuple) -> nn.Module:
    """Batch normalisation over features (flat input) or channels (image input)."""
    return batch_norm_for(in_shape)


def dropout(cfg: BlockConfig, in_shape: tuple) -> nn.Module:
    """Dropout with probability ``p``."""
    return nn.Dropout(cfg.p)


def batch_norm_for(shape: tuple) -> nn.Module:
    """BatchNorm1d or BatchNorm2d, whichever fits ``shape``."""
    return nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])


BUILTIN_LAYERS: dict[str, LayerBuilder] = {
    "linear": linear,
    "conv2d": conv2d,
    "maxpool": maxpool,
    "avgpool": avgpool,
    "flatten": flatten,
    "batchnorm": batchnorm,
    "dropout": dropout,
}


def build_body(cfg: BlockConfig, builder: LayerBuilder, in_shape: tuple[int, ...]) -> nn.Module:
    """The layer, then batch-norm if ``norm`` is set, then the activation."""
    try:
        parts = [builder(cfg, in_shape)]
        if cfg.norm:
            parts.append(batch_norm_for(dry_run(parts[0], in_shape)))
    except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
        # Sizes a recipe may ask for but PyTorch cannot honour: weights too large to allocate,
        # shapes whose element count overflows 64 bits, a zero or negative size.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerwiseError(f"cannot build its {cfg.layer} layer: {reason}") from None
    if cfg.act:
        parts.append(ACTIVATION_MODULES[cfg.act]())
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)
