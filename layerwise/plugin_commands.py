"""Commands that plugins add to the CLI through ``layerwise_register_commands(app)``.

Each plugin's hook fills an app of its own; its commands join the ``layerwise`` app only
when the hook returned without error and took no name that is already in use. So a plugin
whose hook raises, or that tries to replace ``train``, loses its commands (and is listed as
failed by ``layerwise plugins``) while the rest of the CLI works as before.
"""

from __future__ import annotations

import typer
import typer.main

from layerwise.plugins import BUILTINS, FAILED, describe_error, plugin_manager


def command_names(app: typer.Typer) -> set[str]:
    """The names a typer app's commands and groups have on the command line."""
    if not app.registered_commands and not app.registered_groups:
        return set()
    return set(typer.main.get_group(app).commands)


def add_plugin_commands(app: typer.Typer) -> dict[str, list[str]]:
    """Add every plugin's commands to ``app``; return plugin name -> the command names it added."""
    pm = plugin_manager()
    taken = command_names(app)
    added: dict[str, list[str]] = {}
    for impl in pm.hook.layerwise_register_commands.get_hookimpls():
        own = typer.Typer()
        try:
            impl.function(app=own)
            names = command_names(own)
        except Exception as exc:
            if impl.plugin_name == BUILTINS:
                raise  # a bug in layerwise itself
            FAILED[impl.plugin_name] = f"layerwise_register_commands failed: {describe_error(exc)}"
            continue
        clash = sorted(names & taken)
        if clash:
            FAILED[impl.plugin_name] = (
                f"its command(s) {', '.join(clash)} would replace existing ones; rename them"
            )
            continue
        app.registered_commands.extend(own.registered_commands)
        app.registered_groups.extend(own.registered_groups)
        taken |= names
        added[impl.plugin_name] = sorted(names)
    return added
