"""layerwise: layer-wise (local) learning on PyTorch.

A network is a graph of blocks; each block is trained either by the global backprop loss
or by a local objective of its own (the normalised HSIC bottleneck, or a plugin's).
Plugin authors need one import: ``from layerwise import hookimpl``.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("layerwise")
"""Marker for plugin hook implementations: decorate functions named after the hooks in
:mod:`layerwise.hookspecs`."""

__all__ = ["__version__", "hookimpl"]
