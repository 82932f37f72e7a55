"""layerwise: layer-wise (local) learning on PyTorch.

A network is a graph of blocks; each block is trained either by the global backprop loss
or by a local objective of its own (the normalised HSIC bottleneck, or a plugin's).

The Python API (docs/python.md) lives at the package root and is imported on first use, so
that ``from layerwise import hookimpl`` (all a plugin needs) does not import torch::

    import layerwise as lw
    recipe = lw.load_recipe("mnist_hybrid", ["train.epochs=1"])
    run = lw.train(recipe)
    print(lw.evaluate(lw.load_model(run.path), "mnist", noise=[0, 0.5]))
"""

from __future__ import annotations

from typing import Any

from layerwise.hookspecs import hookimpl
from layerwise.version import __version__

API = (
    "Block", "Network", "Run", "Trainer", "batches", "build_model", "evaluate", "load_model", "load_recipe",
    "load_weights", "objective", "save", "split", "train",
)
"""Names served lazily from :mod:`layerwise.api`."""

__all__ = ["__version__", "hookimpl", *API]


def __getattr__(name: str) -> Any:
    # PEP 562: the API (and torch with it) is imported the first time one of its names is used.
    # No submodule may share a name with the API: importing it would shadow the function here.
    if name in API:
        from layerwise import api

        return getattr(api, name)
    raise AttributeError(f"module 'layerwise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
