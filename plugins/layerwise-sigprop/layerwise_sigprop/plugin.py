"""The plugin's hooks. Kept free of heavy imports: layerwise imports this module whenever it
lists plugins, so the objective (and torch with it) is imported only when a registry is filled.

No layer of its own: Signal Propagation trains ordinary layers, so recipes use ``linear``/``conv2d``."""

from layerwise import hookimpl


@hookimpl
def layerwise_register_objectives(registry):
    """Register ``sigprop``."""
    from layerwise_sigprop.objective import SignalPropagation

    registry.register(SignalPropagation.name, SignalPropagation)


@hookimpl
def layerwise_register_streams(registry):
    """Register the ``sigprop`` stream maker: the label signal, prediction by the head or by signal."""
    from layerwise_sigprop.streams import SigpropStreams

    registry.register(SigpropStreams.name, SigpropStreams)
