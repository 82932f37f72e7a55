"""``ff``: registered by its entry point, keeps the routing contract on its streams, and computes Hinton's loss."""

from __future__ import annotations

import pytest
import torch

from layerwise.errors import RecipeError
from layerwise.testing import check_objective, tiny_graph
from layerwise_ff.streams import embed


@pytest.mark.parametrize(
    "options, streams, layer",
    [({}, None, "linear"), ({"threshold": 1.0, "sharpness": 3.0}, {"name": "ff", "negatives": "hardest"}, "linear"),
     ({}, {"name": "ff", "predict": "head"}, "conv2d")],
)
def test_ff_keeps_the_objective_contract(options, streams, layer):
    metrics = check_objective("ff", options, plugin="ff", layer=layer, streams=streams, widths=(16, 16, 16))
    assert set(metrics) == {"loss", "pos", "neg", "acc"}


def test_the_label_is_written_into_the_first_pixels():
    x = torch.randn(3, 1, 4, 4)
    out = embed(x, torch.tensor([0, 2, 9]), 10, 5.0)
    assert out.shape == x.shape
    assert out.flatten(1)[1, :10].tolist() == [0, 0, 5.0, 0, 0, 0, 0, 0, 0, 0]
    torch.testing.assert_close(out.flatten(1)[:, 10:], x.flatten(1)[:, 10:])


def test_negatives_carry_wrong_labels_and_positives_the_true_one():
    graph, _ = tiny_graph("ff", widths=(16, 16, 16))
    x = torch.randn(50, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(50) % 10
    made = graph.make_streams(x, y)
    assert made["pos"].flatten(1)[:, :10].argmax(1).tolist() == y.tolist()
    assert (made["neg"].flatten(1)[:, :10].argmax(1) != y).all()


def test_hardest_negatives_are_the_best_scored_wrong_labels():
    graph, _ = tiny_graph("ff", widths=(16, 16, 16), streams={"name": "ff", "negatives": "hardest"})
    x = torch.randn(20, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(20) % 10
    scores = graph.stream_maker.goodness_per_label(graph, x)
    scores[torch.arange(20), y] = -torch.inf
    made = graph.make_streams(x, y)
    assert made["neg"].flatten(1)[:, :10].argmax(1).tolist() == scores.argmax(1).tolist()


def test_the_network_predicts_by_goodness_or_by_its_head():
    graph, _ = tiny_graph("ff", widths=(16, 16, 16))
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    graph.eval()
    torch.testing.assert_close(graph(x), graph.stream_maker.goodness_per_label(graph, x))
    head, _ = tiny_graph("ff", widths=(16, 16, 16), streams={"name": "ff", "predict": "head"})
    head.eval()
    torch.testing.assert_close(head(x), head.run(x).logits)


@pytest.mark.parametrize("key", ["threshold", "sharpness"])
def test_non_positive_options_are_recipe_errors(key):
    with pytest.raises(RecipeError, match=rf"objective\.{key}: must be > 0, found 0"):
        tiny_graph("ff", {key: 0})


def test_unknown_negatives_are_recipe_errors_at_model_streams():
    with pytest.raises(RecipeError, match=r"model\.streams\.negatives"):
        tiny_graph("ff", streams={"name": "ff", "negatives": "hard"})
