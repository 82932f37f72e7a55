"""layerwise-simmatch: the ``simmatch`` objective, similarity matching (sim and predsim)."""

__version__ = "0.1.0"
