"""layerwise-ff: Forward-Forward (Hinton 2022) as a layerwise plugin: the ``ff`` objective, streams and layer."""

__version__ = "0.1.0"
