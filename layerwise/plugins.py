"""Build the plugin manager once, load third-party plugins, and fill the registries.

Third-party plugins are distributions with an entry point in the ``layerwise`` group.
``LAYERWISE_DISABLE_PLUGINS`` set to ``1``/``all`` skips every one of them, or to a comma
list of entry-point or distribution names skips just those.

A broken plugin never breaks the commands that do not need it. Whatever goes wrong with one
(it cannot be imported, it implements a misspelled hook, one of its hooks raises, it takes a
name that another plugin already has) is recorded in :data:`FAILED` under its name, the
plugin is left out, and ``layerwise plugins`` reports it. An unknown objective, layer or
dataset name then also points at the failed plugins, and at those disabled by
``LAYERWISE_DISABLE_PLUGINS``, since that is usually the cause.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any

import pluggy

from layerwise import hookspecs
from layerwise.errors import LayerwiseError
from layerwise.registry import Registry
from layerwise.version import __version__

BUILTINS = "layerwise.builtins"
"""The plugin name of layerwise's own components."""

DISABLE_ENV = "LAYERWISE_DISABLE_PLUGINS"

FAILED: dict[str, str] = {}
"""Plugin name -> what went wrong, for plugins left out in whole or in part."""

DISTRIBUTIONS: dict[str, tuple[str, str]] = {}
"""Entry-point name -> (distribution name, version), for every entry point seen."""

DISABLED: set[str] = set()
"""Entry-point names skipped because of ``LAYERWISE_DISABLE_PLUGINS``."""

HOOK_NAMES = tuple(name for name in vars(hookspecs) if name.startswith("layerwise_"))
"""Every hook a plugin may implement, as declared in :mod:`layerwise.hookspecs`."""


@dataclass
class Registries:
    """Every registry that hooks fill."""

    objectives: Registry
    layers: Registry
    datasets: Registry
    streams: Registry

    def items(self) -> list[tuple[str, Registry]]:
        """(kind, registry) pairs, for listings."""
        return [("objective", self.objectives), ("layer", self.layers), ("dataset", self.datasets),
                ("stream", self.streams)]


def disabled_plugins() -> set[str] | None:
    """Names blocked by ``LAYERWISE_DISABLE_PLUGINS``; ``None`` means all are blocked."""
    value = os.environ.get(DISABLE_ENV, "").strip()
    if value.lower() in ("1", "all", "true", "*"):
        return None
    return {normalize(name) for name in value.split(",") if name.strip()}


def normalize(name: str) -> str:
    """A plugin or distribution name compared the way packaging does: case, ``-``, ``_`` and ``.`` alike."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def register_plugin(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Register ``plugin`` under ``name`` and check its hooks.

    Raises :class:`LayerwiseError` naming the plugin and the faulty hook, with ``pm`` left as
    it was, when a hook is misspelled (``check_pending``), takes arguments its spec does not
    pass, or when the plugin implements no hook at all (a forgotten ``@hookimpl``).
    """
    if pm.get_plugin(name) is not None:
        raise LayerwiseError(f"a plugin named '{name}' is registered already; choose another name")
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # a known hook with argument names its spec lacks
        raise LayerwiseError(argument_message(name, exc)) from None
    try:
        pm.check_pending()  # a hook name that no spec declares: almost always a typo
    except pluggy.PluginValidationError:
        unknown = [caller.name for caller in pm.get_hookcallers(plugin) or [] if not caller.has_spec()]
        pm.unregister(plugin)
        raise LayerwiseError(unknown_hook_message(name, unknown)) from None
    if not pm.get_hookcallers(plugin):
        pm.unregister(plugin)
        raise LayerwiseError(
            f"plugin '{name}' implements no layerwise hook; decorate its hook functions with "
            f"@hookimpl ('from layerwise import hookimpl'); hooks: {', '.join(HOOK_NAMES)}"
        )


def argument_message(plugin: str, exc: pluggy.PluginValidationError) -> str:
    """Say which hook implementation asks for arguments its hook does not pass, and which it does."""
    text = str(exc)
    hook = re.search(r"for hook '(\w+)'", text)
    definition = re.search(r"hookimpl definition: (.+)", text)
    if not (hook and definition and hook[1] in HOOK_NAMES):
        return f"plugin '{plugin}': {' '.join(text.split())}"
    passed = ", ".join(inspect.signature(getattr(hookspecs, hook[1])).parameters)
    return (f"plugin '{plugin}': {definition[1].strip()} asks for arguments that {hook[1]} does not pass; "
            f"it passes: {passed}")


def unknown_hook_message(plugin: str, hooks: list[str]) -> str:
    """Say which of the plugin's hooks layerwise does not define, with the closest real one."""
    parts = []
    guessed = True
    for hook in hooks:
        close = difflib.get_close_matches(hook, HOOK_NAMES, n=1, cutoff=0.6)
        parts.append(f"'{hook}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        guessed = guessed and bool(close)
    verdict = "which is not a layerwise hook" if len(parts) == 1 else "which are not layerwise hooks"
    listing = "" if guessed else f"; hooks: {', '.join(HOOK_NAMES)}"  # a suggestion says enough
    return f"plugin '{plugin}' implements {', '.join(parts)}, {verdict}{listing}"


def distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str, str] | None:
    """(name, version) of the distribution that declares ``ep``, when known."""
    dist = getattr(ep, "dist", None)
    return (dist.name, dist.version) if dist is not None else None


def load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register each ``layerwise`` entry point, recording failures instead of raising."""
    blocked = disabled_plugins()
    for ep in importlib.metadata.entry_points(group="layerwise"):
        dist = distribution_of(ep)
        if dist is not None:
            DISTRIBUTIONS[ep.name] = dist
        if blocked is None or normalize(ep.name) in blocked or (dist and normalize(dist[0]) in blocked):
            DISABLED.add(ep.name)
            continue
        if pm.get_plugin(ep.name) is not None:  # the same distribution found twice on sys.path
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not break the commands that do not need it
            FAILED[ep.name] = f"cannot be imported ({ep.value}): {type(exc).__name__}: {exc}"
            continue
        try:
            register_plugin(pm, plugin, ep.name)
        except LayerwiseError as exc:
            FAILED[ep.name] = str(exc)


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded."""
    from layerwise import builtins

    pm = pluggy.PluginManager("layerwise")
    pm.add_hookspecs(hookspecs)
    register_plugin(pm, builtins, BUILTINS)
    load_entry_points(pm)
    return pm


def failure_note() -> str:
    """A pointer at failed and disabled plugins, appended to unknown-name errors; empty when none.

    A name is often unknown because the plugin providing it failed or was switched off. What a
    disabled plugin would provide cannot be known without importing it, which disabling exists
    to avoid, so the note names every disabled plugin and leaves the match to the reader.
    """
    note = ""
    if FAILED:
        note += f"; plugins that failed to load: {', '.join(sorted(FAILED))} (see 'layerwise plugins')"
    if DISABLED:
        labels = ", ".join(plugin_label(name) for name in sorted(DISABLED))
        note += f"; plugins disabled by {DISABLE_ENV}, which may provide it: {labels}"
    return note


def plugin_label(name: str) -> str:
    """An entry point's name with its distribution's, as users know either: 'localce (layerwise-localce)'."""
    distribution = DISTRIBUTIONS.get(name, (name, ""))[0]
    return name if normalize(distribution) == normalize(name) else f"{name} ({distribution})"


@functools.cache
def registries() -> Registries:
    """Registries filled by every plugin's hooks, built on first use."""
    pm = plugin_manager()
    regs = Registries(Registry("objective"), Registry("layer"), Registry("dataset"), Registry("stream maker"))
    calls = [
        ("layerwise_register_objectives", regs.objectives),
        ("layerwise_register_layers", regs.layers),
        ("layerwise_register_datasets", regs.datasets),
        ("layerwise_register_streams", regs.streams),
    ]
    for _, registry in regs.items():
        registry.note = failure_note
    for hook_name, registry in calls:
        # Call each implementation ourselves, rather than through pm.hook, so that the
        # registry knows which plugin registered what (for duplicate errors and listings),
        # and so that one plugin's failure leaves the others' registrations intact.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            registry.set_owner(impl.plugin_name)
            try:
                impl.function(registry=registry)
            except Exception as exc:
                if impl.plugin_name == BUILTINS:
                    raise  # a bug in layerwise itself
                drop_plugin(pm, regs, impl.plugin_name, f"{hook_name} failed: {describe_error(exc)}")
    return regs


def describe_error(exc: Exception) -> str:
    """An exception as one line: a user error's message alone, anything else with its type."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, LayerwiseError) else f"{type(exc).__name__}: {text}"


def drop_plugin(pm: pluggy.PluginManager, regs: Registries, name: str, reason: str) -> None:
    """Leave plugin ``name`` out entirely: unregister it and forget what it registered."""
    FAILED[name] = reason
    for _, registry in regs.items():
        registry.remove_owner(name)
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)


def plugin_version(name: str) -> tuple[str, str]:
    """(distribution, version) of a plugin: layerwise's own for the built-ins, ``?`` when not installed
    (a plugin registered in-process, as tests do)."""
    if name == BUILTINS:
        return "layerwise", __version__
    return DISTRIBUTIONS.get(name, ("?", "?"))


def describe_plugins(commands: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """One row per plugin for ``layerwise plugins``: version, what it provides, and its status.

    ``commands`` maps plugin names to the CLI commands they added (see :mod:`layerwise.plugin_commands`).
    """
    pm, regs = plugin_manager(), registries()
    names = [name for name, _ in pm.list_name_plugin()]
    names += [n for n in sorted(FAILED) + sorted(DISABLED) if n not in names]
    rows = []
    for name in names:
        distribution, version = plugin_version(name)
        provides = {
            f"{kind}s": [item for item in registry.names() if registry.owner(item) == name]
            for kind, registry in regs.items()
        }
        provides["commands"] = sorted((commands or {}).get(name, []))
        status = "disabled" if name in DISABLED else "failed" if name in FAILED else "ok"
        rows.append({"name": name, "distribution": distribution, "version": version, "status": status,
                     "error": FAILED.get(name), **provides})
    return rows


def reset() -> None:
    """Forget every loaded plugin, so that the next use discovers them afresh (tests use this)."""
    plugin_manager.cache_clear()
    registries.cache_clear()
    FAILED.clear()
    DISTRIBUTIONS.clear()
    DISABLED.clear()
