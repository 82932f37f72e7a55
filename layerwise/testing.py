"""Helpers for plugin authors' tests: check that an objective keeps the layerwise contract.

    from layerwise.testing import check_objective

    def test_my_objective():
        check_objective("myloss", {"alpha": 0.5}, plugin="myloss")

:func:`check_objective` builds a tiny network ``bp0 -> local1 -> bp2 -> head`` in float64
with the objective on ``local1`` and proves, on one batch, what tests/test_routing.py proves
for the built-ins: the local loss trains ``local1`` (and the objective's helper modules) and
nothing else, and the global cross-entropy trains the other blocks and not ``local1``. Then
it trains a few steps and checks that every parameter the objective owns moves.

Sizes: the input is 1x4x4 (16 pixels; 1x6x6 for ``conv2d``), there are 10 classes, and the
widths of ``bp0``, ``local1`` and ``bp2`` are ``widths`` (default 8, 8, 8: fewer features than
classes; pass wider ones, e.g. ``(16, 16, 16)``, when the objective needs one feature per
class). For an objective that reads streams (``Objective.streams``), the network carries its
maker's streams, and the routing proof covers every stream.

:func:`use_plugin` registers a plugin object for the duration of a ``with`` block, so an
objective can be tested before its package is installed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.graph import Network
from layerwise.objectives.base import LossContext
from layerwise.plugins import FAILED, plugin_manager, register_plugin, registries
from layerwise.trainer import Trainer

NUM_CLASSES = 10
INPUT_SHAPES = {"linear": (1, 4, 4), "conv2d": (1, 6, 6)}
LOCAL_BLOCK = "local1"
WIDTHS = (8, 8, 8)
"""Default widths of ``bp0``, ``local1`` and ``bp2`` in :func:`tiny_graph`."""


@contextlib.contextmanager
def use_plugin(plugin: Any, name: str | None = None) -> Iterator[None]:
    """Register ``plugin`` (a module, class or namespace of ``@hookimpl`` functions) inside the block.

    Raises :class:`~layerwise.errors.LayerwiseError` as loading would, for example when a
    hook name is misspelled.
    """
    pm = plugin_manager()
    name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
    register_plugin(pm, plugin, name)
    registries.cache_clear()
    try:
        yield
    finally:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        FAILED.pop(name, None)
        registries.cache_clear()


def tiny_graph(objective: str, options: dict[str, Any] | None = None, *, layer: str = "linear",
               seed: int = 0, widths: tuple[int, int, int] = WIDTHS, streams: dict[str, Any] | None = None
               ) -> tuple[Network, Trainer]:
    """A float64 network ``bp0 -> local1 -> bp2 -> head`` whose ``local1`` uses ``objective``.

    ``layer`` is ``linear`` (input 1x4x4) or ``conv2d`` (input 1x6x6, so that ``local1``
    outputs an image-shaped tensor; ``widths`` are then channels, 3 and 4 by default).
    ``widths`` are those of ``bp0``, ``local1`` and ``bp2``; ``streams`` is a recipe's
    ``model.streams`` (default: the maker the objective reads, if any).
    """
    spec = {"name": objective, **(options or {})}
    if len(widths) != 3 or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"widths must be three positive integers (bp0, local1, bp2), not {widths!r}")
    if layer == "conv2d":
        channels = (3, 4) if widths == WIDTHS else widths[:2]
        body = [{"name": "bp0", "layer": "conv2d", "out": channels[0], "padding": 1, "act": "relu"},
                {"name": LOCAL_BLOCK, "layer": "conv2d", "out": channels[1], "padding": 1, "act": "relu",
                 "objective": spec}]
    elif layer == "linear":
        body = [{"name": "bp0", "layer": "linear", "out": widths[0], "act": "relu"},
                {"name": LOCAL_BLOCK, "layer": "linear", "out": widths[1], "act": "relu", "objective": spec}]
    else:
        raise ValueError(f"layer must be 'linear' or 'conv2d', not {layer!r}")
    tail = [{"name": "bp2", "layer": "linear", "out": widths[2], "act": "relu"},
            {"name": "head", "layer": "linear", "out": NUM_CLASSES}]
    model = {"subnetworks": [{"name": "sn1", "blocks": body}, {"name": "sn2", "blocks": tail}]}
    if streams is not None:
        model["streams"] = streams
    recipe = parse_recipe(
        {
            "name": "check",
            "data": {"dataset": "mnist"},
            "model": model,
            "optim": {"local": {"name": "adam", "lr": 1e-2}, "global": {"name": "adam", "lr": 1e-2}},
            "train": {"device": "cpu"},
        },
        f"check_objective({objective!r})",
    )
    torch.manual_seed(seed)
    graph = network_from_recipe(recipe, INPUT_SHAPES[layer], NUM_CLASSES).double()
    return graph, Trainer.from_recipe(graph, recipe)


def random_batch(input_shape: tuple[int, ...], batch: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 inputs and labels covering several classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, dtype=torch.float64, generator=g)
    y = torch.arange(batch) % NUM_CLASSES
    return x, y[torch.randperm(batch, generator=g)]


def check_objective(name: str, options: dict[str, Any] | None = None, *, plugin: str | None = None,
                    layer: str = "linear", steps: int = 3, widths: tuple[int, int, int] = WIDTHS,
                    streams: dict[str, Any] | None = None) -> dict[str, float]:
    """Assert that objective ``name`` keeps the contract; return its metrics after ``steps`` steps.

    ``plugin``, when given, must be the plugin that registered it (the entry point's name for
    an installed distribution). ``widths`` are the widths of ``bp0``, ``local1`` and ``bp2``
    (see the module docstring for every size); ``streams`` a recipe's ``model.streams``, for an
    objective that reads streams. Raises :class:`AssertionError` saying what is wrong.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    objectives = registries().objectives
    expect(name in objectives, objectives.unknown_message(name))
    if plugin is not None:
        expect(objectives.owner(name) == plugin,
               f"objective '{name}' is registered by '{objectives.owner(name)}', not by '{plugin}'")
    expect(objectives.get(name).local, f"objective '{name}' has local = False, so the global loss would train it")
    graph, trainer = tiny_graph(name, options, layer=layer, widths=widths, streams=streams)
    x, y = random_batch(INPUT_SHAPES[layer])
    made = graph.make_streams(x, y)  # the same streams for the step and the proof (negatives may be random)
    trainer.compute_gradients(x, y, streams=made)
    check_routing(graph, x, y, made)

    local = graph.blocks[LOCAL_BLOCK]
    before = {key: p.detach().clone() for key, p in local.named_parameters()}
    for seed in range(steps):
        result = trainer.step(*random_batch(INPUT_SHAPES[layer], seed=seed + 2))
    for key, p in local.named_parameters():
        expect(not torch.equal(before[key], p.detach()),
               f"parameter '{key}' of block {LOCAL_BLOCK} did not change in {steps} steps: "
               f"does loss() use it? (helper modules must take part in the loss)")
    metrics = {key: float(value) for key, value in result.block_metrics[LOCAL_BLOCK].items()}
    expect(all(math.isfinite(v) for v in metrics.values()), f"non-finite metrics after {steps} steps: {metrics}")
    return metrics


def check_routing(graph: Network, x: torch.Tensor, y: torch.Tensor,
                  streams: dict[str, torch.Tensor] | None = None) -> None:
    """Compare every ``.grad`` with ``torch.autograd.grad`` of the one loss allowed to reach it:
    its block's own loss for a local block, the global cross-entropy for the others. Works on any
    network whose gradients a :class:`~layerwise.trainer.Trainer` has just computed for ``(x, y)``
    (and ``streams``, the batch's streams it was given, on a network that carries some)."""
    out = graph.run(x, streams=streams)
    losses = {}
    for block in graph.local_blocks():
        ctx = LossContext(x=x, y=y, num_classes=graph.num_classes, block_input=out.inputs[block.name],
                          streams={stream: held[block.name] for stream, held in out.streams.items()}, block=block)
        losses[block.name] = checked_loss(block.objective, out.outputs[block.name], ctx)
    global_loss = nn.functional.cross_entropy(out.logits, y)
    for block_name in graph.order:
        block = graph.blocks[block_name]
        allowed = losses.get(block_name, global_loss)
        for key, p in block.named_parameters():
            want = torch.autograd.grad(allowed, p, retain_graph=True, allow_unused=True)[0]
            want = torch.zeros_like(p) if want is None else want
            got = torch.zeros_like(p) if p.grad is None else p.grad
            expect(torch.allclose(got, want, rtol=1e-7, atol=1e-10),
                   f"{block_name}.{key}: its gradient is not that of the "
                   f"{'global' if allowed is global_loss else 'local'} loss alone (largest difference "
                   f"{float((got - want).abs().max()):.3g})")


def checked_loss(objective, z: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """The objective's loss on ``z``, after checking that ``loss()`` keeps its contract."""
    loss, metrics = objective.loss(z, ctx)
    expect(isinstance(loss, torch.Tensor) and loss.dim() == 0, f"loss() must return a 0-d tensor, got {loss!r}")
    expect(bool(torch.isfinite(loss)), f"loss() returned {loss.detach()}")
    expect(isinstance(metrics, dict) and all(isinstance(k, str) for k in metrics),
           "loss() must return (loss, metrics) with metrics a dict of str -> tensor")
    for key, value in metrics.items():
        expect(isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad,
               f"metric '{key}' must be a detached 0-d tensor (use .detach())")
    outputs = [z, *ctx.streams.values()]  # the block's output on the data and on every stream
    found = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
    expect(any(g is not None and bool(g.abs().max() > 0) for g in found),
           "the local loss does not depend on the block's output z (nor on its outputs on the streams, ctx.streams)")
    return loss


def expect(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O``."""
    if not condition:
        raise AssertionError(message)
