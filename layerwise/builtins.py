"""layerwise's own components, registered through the same hooks as any plugin."""

from __future__ import annotations

from layerwise.hookspecs import hookimpl


@hookimpl
def layerwise_register_objectives(registry):
    """The built-in objectives: ``none`` (alias ``backprop``) and ``nhsic``."""
    from layerwise.objectives.base import Backprop
    from layerwise.objectives.nhsic import NHSIC

    registry.register(Backprop.name, Backprop, aliases=("backprop",))
    registry.register(NHSIC.name, NHSIC)


@hookimpl
def layerwise_register_layers(registry):
    """The built-in layers: linear, conv2d, flatten, pooling, batch-norm and dropout."""
    from layerwise.layers import BUILTIN_LAYERS

    for name, builder in BUILTIN_LAYERS.items():
        registry.register(name, builder)


@hookimpl
def layerwise_register_datasets(registry):
    """The built-in datasets: mnist, fashion_mnist and cifar10."""
    from layerwise.data import builtin_datasets

    for spec in builtin_datasets():
        registry.register(spec.name, spec)
