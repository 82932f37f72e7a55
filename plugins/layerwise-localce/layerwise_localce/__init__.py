"""layerwise-localce: the ``localce`` objective, local cross-entropy through an auxiliary head."""

__version__ = "0.1.0"
