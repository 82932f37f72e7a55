"""``simmatch``: registered by its entry point, keeps the routing contract, and computes the paper's loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.objectives.base import BlockInfo, LossContext
from layerwise.testing import check_objective
from layerwise_simmatch.objective import SimMatch, SimMatchConfig, similarity_matrix


@pytest.mark.parametrize(
    "options, layer",
    [({}, "linear"), ({"center": False}, "linear"), ({"pred_weight": 0.5}, "linear"), ({"pred_weight": 0.1}, "conv2d")],
)
def test_simmatch_keeps_the_objective_contract(options, layer):
    metrics = check_objective("simmatch", options, plugin="simmatch", layer=layer)
    expected = {"loss", "sim", "pred", "acc"} if options.get("pred_weight") else {"loss", "sim"}
    assert set(metrics) == expected


def test_similarity_matrix_is_a_matrix_of_cosines():
    torch.manual_seed(0)
    a = torch.randn(6, 2, 3, dtype=torch.float64)
    s = similarity_matrix(a, center=False)
    flat = a.flatten(1)
    expected = nn.functional.cosine_similarity(flat[:, None, :], flat[None, :, :], dim=2)
    torch.testing.assert_close(s, expected)
    centred = similarity_matrix(a)
    torch.testing.assert_close(centred.diagonal(), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(centred, centred.T)


@pytest.mark.parametrize("center, other", [(True, -1 / 9), (False, 0.0)])
def test_label_similarities_are_one_within_a_class(center, other):
    y = nn.functional.one_hot(torch.tensor([0, 0, 4, 7]), 10).double()
    s = similarity_matrix(y, center)
    expected = torch.full((4, 4), other, dtype=torch.float64)
    expected[:2, :2] = 1.0
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(s, expected)


def context(y):
    return LossContext(x=torch.zeros(len(y), 1, 2, 2, dtype=torch.float64), y=y, num_classes=10)


def info(out_shape):
    return BlockInfo("b", in_shape=(4,), out_shape=out_shape, input_shape=(1, 2, 2), num_classes=10)


def test_outputs_shaped_like_the_labels_have_zero_sim_loss():
    y = torch.tensor([1, 1, 3, 5, 3])
    objective = SimMatch(SimMatchConfig(), info((10,)))
    perfect = 3.0 * nn.functional.one_hot(y, 10).double()  # same directions, any scale
    loss, metrics = objective.loss(perfect, context(y))
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
    bad, _ = objective.loss(torch.randn(5, 10, dtype=torch.float64), context(y))
    assert float(bad) > 0.01
    assert set(metrics) == {"loss", "sim"}


def test_predsim_adds_the_weighted_cross_entropy_of_its_own_head():
    torch.manual_seed(0)
    y = torch.tensor([2, 0, 9, 2])
    sim_only = SimMatch(SimMatchConfig(), info((6,)))
    assert not list(sim_only.parameters()), "sim needs no helper module"
    predsim = SimMatch(SimMatchConfig(pred_weight=0.25), info((6,))).double()
    z = torch.randn(4, 6, dtype=torch.float64)
    loss, metrics = predsim.loss(z, context(y))
    sim, _ = sim_only.loss(z, context(y))
    ce = nn.functional.cross_entropy(predsim.head(z), y)
    torch.testing.assert_close(loss, sim + 0.25 * ce)
    torch.testing.assert_close(metrics["pred"], ce.detach())


def test_label_similarities_are_computed_once_per_batch():
    y = torch.tensor([0, 1, 1])
    ctx = context(y)
    objective = SimMatch(SimMatchConfig(), info((4,)))
    objective.loss(torch.randn(3, 4, dtype=torch.float64), ctx)
    cached = len(ctx.kernels)
    objective.loss(torch.randn(3, 4, dtype=torch.float64), ctx)
    assert len(ctx.kernels) == cached


def test_negative_pred_weight_is_a_recipe_error():
    from layerwise.errors import RecipeError
    from layerwise.testing import tiny_graph

    with pytest.raises(RecipeError, match=r"objective\.pred_weight: must be >= 0, found -1"):
        tiny_graph("simmatch", {"pred_weight": -1})


def test_does_not_depend_on_the_localce_plugin():
    import layerwise_simmatch.objective as module

    assert "layerwise_localce" not in open(module.__file__).read()
