"""The hooks that plugins implement. Each one hands the plugin something to fill.

Built-in components register through these same hooks (see :mod:`layerwise.builtins`),
so a third-party objective is on equal footing with ``nhsic``. docs/plugins.md documents
every hook, and tests/test_plugins.py fails if one lacks a test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # annotations only, so that importing the specs stays cheap
    import typer

    from layerwise.registry import Registry

hookspec = pluggy.HookspecMarker("layerwise")

hookimpl = pluggy.HookimplMarker("layerwise")
"""Marker for plugin hook implementations: decorate functions named after the hooks below.
Plugin authors import it from the package root: ``from layerwise import hookimpl``."""


@hookspec
def layerwise_register_objectives(registry: Registry) -> None:
    """Register objective classes: ``registry.register("name", ObjectiveClass)``."""


@hookspec
def layerwise_register_layers(registry: Registry) -> None:
    """Register layer builders: ``registry.register("name", build_fn)``."""


@hookspec
def layerwise_register_datasets(registry: Registry) -> None:
    """Register datasets: ``registry.register("name", DatasetSpec(...))``."""


@hookspec
def layerwise_register_streams(registry: Registry) -> None:
    """Register stream makers (layerwise.streams): ``registry.register("name", StreamMakerClass)``."""


@hookspec
def layerwise_register_commands(app: typer.Typer) -> None:
    """Add CLI commands: ``@app.command()`` or ``app.add_typer(sub_app, name="group")`` on a typer app."""
