"""``localce``: registered by its entry point, keeps the routing contract, and computes the papers' loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.objectives.base import BlockInfo, LossContext
from layerwise.testing import check_objective
from layerwise_localce.objective import LocalCE, LocalCEConfig


@pytest.mark.parametrize(
    "options, layer",
    [({}, "linear"), ({"hidden": 16}, "linear"), ({}, "conv2d"), ({"pool": 2, "hidden": 8}, "conv2d")],
)
def test_localce_keeps_the_objective_contract(options, layer):
    metrics = check_objective("localce", options, plugin="localce", layer=layer)
    assert set(metrics) == {"loss", "acc"}
    assert 0.0 <= metrics["acc"] <= 1.0


def info(out_shape):
    return BlockInfo("b", in_shape=(8,), out_shape=out_shape, input_shape=(1, 4, 4), num_classes=10)


def test_loss_is_the_cross_entropy_of_the_auxiliary_head():
    torch.manual_seed(0)
    objective = LocalCE(LocalCEConfig(), info((6,)))
    z = torch.randn(5, 6)
    y = torch.tensor([0, 3, 3, 9, 1])
    loss, metrics = objective.loss(z, LossContext(x=torch.zeros(5, 1, 4, 4), y=y, num_classes=10))
    linear = objective.head[-1]
    torch.testing.assert_close(loss, nn.functional.cross_entropy(z @ linear.weight.T + linear.bias, y))
    assert metrics["acc"] == ((z @ linear.weight.T + linear.bias).argmax(1) == y).float().mean()


def test_pool_and_hidden_shape_the_head():
    objective = LocalCE(LocalCEConfig(hidden=7, pool=2), info((3, 8, 8)))
    linears = [m for m in objective.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3 * 2 * 2, 7), (7, 10)]
    flat = LocalCE(LocalCEConfig(pool=2), info((12,)))  # pool does not apply to flat outputs
    assert flat.head[-1].in_features == 12


def test_negative_options_are_recipe_errors():
    from layerwise.errors import RecipeError
    from layerwise.testing import tiny_graph

    with pytest.raises(RecipeError, match=r"objective\.hidden: must be >= 0, found -1"):
        tiny_graph("localce", {"hidden": -1})
