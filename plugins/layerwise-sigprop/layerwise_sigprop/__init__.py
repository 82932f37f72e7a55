"""layerwise-sigprop: Signal Propagation (Kohan et al. 2023) as a layerwise plugin: ``sigprop`` objective, streams."""

__version__ = "0.1.0"
