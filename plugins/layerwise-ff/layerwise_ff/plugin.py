"""The plugin's hooks. Kept free of heavy imports: layerwise imports this module whenever it
lists plugins, so the objective (and torch with it) is imported only when a registry is filled."""

from layerwise import hookimpl


@hookimpl
def layerwise_register_objectives(registry):
    """Register ``ff``."""
    from layerwise_ff.objective import ForwardForward

    registry.register(ForwardForward.name, ForwardForward)


@hookimpl
def layerwise_register_streams(registry):
    """Register the ``ff`` stream maker: positive and negative streams, prediction by goodness."""
    from layerwise_ff.streams import FFStreams

    registry.register(FFStreams.name, FFStreams)


@hookimpl
def layerwise_register_layers(registry):
    """Register ``fflinear``: FF's length normalisation, then a linear layer."""
    from layerwise_ff.layers import fflinear

    registry.register("fflinear", fflinear)
