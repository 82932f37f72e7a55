"""Build the plugin manager once, load third-party plugins, and fill the registries.

Third-party plugins are distributions with an entry point in the ``layerwise`` group.
``LAYERWISE_DISABLE_PLUGINS`` set to ``1``/``all`` skips every one of them, or to a comma
list of names skips just those. A plugin that fails to import is recorded in
:data:`FAILED` and reported by ``layerwise plugins``; commands that do not need it still work.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass

import pluggy

from layerwise import hookspecs
from layerwise.registry import Registry

FAILED: dict[str, str] = {}
"""Entry-point name -> error text, for plugins that could not be loaded."""

DISTRIBUTIONS: dict[str, tuple[str, str]] = {}
"""Entry-point name -> (distribution name, version), for ``layerwise plugins``."""


@dataclass
class Registries:
    """Every registry that hooks fill."""

    objectives: Registry
    layers: Registry
    datasets: Registry


def disabled_plugins() -> set[str] | None:
    """Names blocked by ``LAYERWISE_DISABLE_PLUGINS``; ``None`` means all are blocked."""
    value = os.environ.get("LAYERWISE_DISABLE_PLUGINS", "").strip()
    if value.lower() in ("1", "all", "true", "*"):
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register each ``layerwise`` entry point, recording failures instead of raising."""
    blocked = disabled_plugins()
    if blocked is None:
        return
    for ep in importlib.metadata.entry_points(group="layerwise"):
        if ep.name in blocked or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not break the commands that do not need it
            FAILED[ep.name] = f"{type(exc).__name__}: {exc}"
            continue
        pm.register(plugin, name=ep.name)
        if ep.dist is not None:
            DISTRIBUTIONS[ep.name] = (ep.dist.name, ep.dist.version)


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded."""
    from layerwise import builtins

    pm = pluggy.PluginManager("layerwise")
    pm.add_hookspecs(hookspecs)
    pm.register(builtins, name="layerwise.builtins")
    load_entry_points(pm)
    pm.check_pending()  # a misspelled hook name in a plugin fails loudly here
    return pm


@functools.cache
def registries() -> Registries:
    """Registries filled by every plugin's hooks, built on first use."""
    pm = plugin_manager()
    regs = Registries(Registry("objective"), Registry("layer"), Registry("dataset"))
    calls = [
        ("layerwise_register_objectives", regs.objectives),
        ("layerwise_register_layers", regs.layers),
        ("layerwise_register_datasets", regs.datasets),
    ]
    for hook_name, registry in calls:
        # Call each implementation ourselves, rather than through pm.hook, so that the
        # registry knows which plugin registered what (for duplicate errors and listings).
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            registry.set_owner(impl.plugin_name)
            impl.function(registry=registry)
    return regs


def plugin_version(name: str) -> tuple[str, str]:
    """(distribution, version) of a registered plugin; built-ins report layerwise's own."""
    from layerwise import __version__

    return DISTRIBUTIONS.get(name, ("layerwise", __version__))
