"""The plugin's hooks. Kept free of heavy imports: layerwise imports this module whenever it
lists plugins, so the objective (and torch with it) is imported only when a registry is filled."""

from layerwise import hookimpl


@hookimpl
def layerwise_register_objectives(registry):
    """Register ``simmatch``."""
    from layerwise_simmatch.objective import SimMatch

    registry.register(SimMatch.name, SimMatch)
