"""Trainer options beyond routing: freeing local activations early, and bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.trainer import Trainer

NHSIC = {"name": "nhsic", "sigma": 2.0, "beta": 10.0}


def recipe_for(kinds: list[str], **train) -> dict:
    """Blocks b0..bn of the given kinds ('local' or 'none'), then a head; 'hsic_only' detaches the head."""
    blocks = [{"name": f"b{i}", "layer": "linear", "out": 8, "act": "relu",
               "objective": NHSIC if kind == "local" else "none"} for i, kind in enumerate(kinds)]
    head = {"name": "head", "layer": "linear", "out": 10, "detach": all(k == "local" for k in kinds)}
    return {"name": "t", "data": {"dataset": "mnist"}, "train": {"device": "cpu", **train},
            "model": {"subnetworks": [{"name": "s", "blocks": blocks + [head]}]}}


def build(kinds, dtype=torch.float64, **train):
    recipe = parse_recipe(recipe_for(kinds, **train), "t")
    torch.manual_seed(0)
    graph = network_from_recipe(recipe, (1, 4, 4), 10).to(dtype)
    return graph, Trainer.from_recipe(graph, recipe)


def batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 4, 4, generator=g).to(dtype), torch.arange(16) % 10


@pytest.mark.parametrize("kinds, through", [
    (["local", "none", "local", "none"], {"b1", "b2", "b3", "head"}),  # hybrid: all but the first block
    (["local", "local", "local"], {"head"}),                                  # HSIC-only: only the head
    (["local", "none", "local"], {"b1", "b2", "head"}),                      # nothing trainable before b0
])
def test_global_gradient_blocks(kinds, through):
    graph, _ = build(kinds)
    assert graph.global_gradient_blocks() == through


@pytest.mark.parametrize("kinds", [["local", "none", "local", "none"], ["local", "local", "local"],
                                   ["local", "none", "local"]])
def test_free_early_changes_no_gradient(kinds):
    grads = {}
    for free in (True, False):
        graph, trainer = build(kinds, free_early=free)
        trainer.compute_gradients(*batch())
        grads[free] = {k: p.grad.clone() for k, p in graph.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for key in grads[True]:
        assert torch.equal(grads[True][key], grads[False][key]), key


def test_free_early_hands_later_blocks_a_detached_input():
    seen = {}
    for free in (True, False):
        graph, trainer = build(["local", "local", "local"], free_early=free)

        def record(module, args, free=free):
            seen[free] = args[0]

        handle = graph.blocks["b1"].register_forward_pre_hook(record)
        trainer.compute_gradients(*batch())
        handle.remove()
    assert seen[True].grad_fn is None, "b0's graph is not kept alive for b1"
    assert seen[False].grad_fn is not None


def test_bf16_autocast_trains_with_float32_kernels():
    graph, trainer = build(["local", "none", "local", "none"], dtype=torch.float32, precision="bf16")
    before = {k: p.detach().clone() for k, p in graph.named_parameters()}
    result = trainer.step(*batch(torch.float32))
    assert result.logits.dtype == torch.bfloat16, "the forward pass ran under bf16 autocast"
    assert result.global_loss.dtype == torch.float32
    for key, p in graph.named_parameters():
        assert p.dtype == torch.float32 and not torch.equal(before[key], p), key
    assert all(torch.isfinite(v) for m in result.block_metrics.values() for v in m.values())
