"""The hooks that plugins implement. Each one hands the plugin a registry to fill.

Built-in components register through these same hooks (see :mod:`layerwise.builtins`),
so a third-party objective is on equal footing with ``nhsic``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("layerwise")


@hookspec
def layerwise_register_objectives(registry):
    """Register objective classes: ``registry.register("name", ObjectiveClass)``."""


@hookspec
def layerwise_register_layers(registry):
    """Register layer builders: ``registry.register("name", build_fn)``."""


@hookspec
def layerwise_register_datasets(registry):
    """Register datasets: ``registry.register("name", DatasetSpec(...))``."""
