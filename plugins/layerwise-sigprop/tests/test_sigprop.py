"""``sigprop``: registered by its entry point, keeps the routing contract on its signal stream,
makes seeded signals, predicts by its head or by the signals, and learns on real MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerwise.errors import RecipeError
from layerwise.testing import check_objective, tiny_graph
from layerwise_sigprop.streams import SigpropStreams, projection

SHARED_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


@pytest.mark.parametrize(
    "options, streams, layer",
    [({"loss": "l2"}, None, "linear"), ({"loss": "sim", "temperature": 0.5}, None, "linear"),
     ({"loss": "sim"}, {"name": "sigprop", "seed": 3, "predict": "signal"}, "conv2d"),
     ({"loss": "l2"}, {"name": "sigprop", "predict": "signal", "score": "cosine"}, "conv2d")],
)
def test_sigprop_keeps_the_objective_contract(options, streams, layer):
    metrics = check_objective("sigprop", options, plugin="sigprop", layer=layer, streams=streams, widths=(16, 16, 16))
    assert set(metrics) == {"loss", "acc"}
    assert 0.0 <= metrics["acc"] <= 1.0


def test_the_signal_is_the_class_projection_shaped_like_the_input():
    graph, _ = tiny_graph("sigprop", widths=(16, 16, 16))
    x = torch.randn(20, 1, 4, 4, dtype=torch.float64) * 3 + 1
    y = torch.arange(20) % 10
    signal = graph.make_streams(x, y)["signal"]
    assert signal.shape == x.shape
    torch.testing.assert_close(signal[:10], signal[10:])  # a class's signal is the same for all its samples
    assert len({tuple(row.tolist()) for row in signal[:10].flatten(1)}) == 10  # one signal per class
    # Scaled to the batch's statistics: each class signal has the batch's mean and std.
    per_class = signal[:10].flatten(1)
    torch.testing.assert_close(per_class.mean(1), x.mean().expand(10))
    torch.testing.assert_close(per_class.std(1, correction=0), x.std(correction=0).expand(10))


def test_the_projection_is_fixed_by_its_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = projection(10, 16, 0), projection(10, 16, 0), projection(10, 16, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    first, _ = tiny_graph("sigprop", seed=0, streams={"name": "sigprop", "seed": 5})
    other, _ = tiny_graph("sigprop", seed=1, streams={"name": "sigprop", "seed": 5})
    assert isinstance(first.stream_maker, SigpropStreams)
    assert torch.equal(first.stream_maker.projection, other.stream_maker.projection)
    assert "stream_maker.projection" in first.state_dict()  # saved in checkpoints


@pytest.mark.parametrize("loss, score", [("sim", "auto"), ("l2", "auto"), ("l2", "cosine")])
def test_predict_signal_scores_each_sample_against_every_class_signal(loss, score):
    graph, _ = tiny_graph("sigprop", {"loss": loss}, widths=(16, 16, 16),
                          streams={"name": "sigprop", "predict": "signal", "score": score})
    graph.eval()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    scores = graph(x)
    assert scores.shape == (6, 10)
    maker = graph.stream_maker
    data = graph.run(x).outputs["local1"].flatten(1)
    signals = graph.run(maker.class_signals(x)).outputs["local1"].flatten(1)
    if loss == "sim" or score == "cosine":
        expected = torch.nn.functional.normalize(data, dim=1) @ torch.nn.functional.normalize(signals, dim=1).T
    else:
        expected = -torch.cdist(data, signals)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(torch.softmax(expected, 1).sum(1), torch.ones(6, dtype=torch.float64))


def test_predict_head_uses_the_heads_logits():
    graph, _ = tiny_graph("sigprop", widths=(16, 16, 16))
    graph.eval()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(graph(x), graph.run(x).logits)


def test_a_perfect_match_gives_zero_l2_loss():
    from layerwise.objectives.base import LossContext
    from layerwise_sigprop.objective import SignalPropagation, SigpropConfig

    objective = SignalPropagation(SigpropConfig(loss="l2"), None)
    z = torch.randn(4, 8)
    loss, metrics = objective.loss(z, LossContext(x=z, y=torch.arange(4), num_classes=10, streams={"signal": z}))
    assert float(loss) == 0.0 and float(metrics["acc"]) == 1.0


@pytest.mark.parametrize("temperature", [0, -1])
def test_non_positive_temperature_is_a_recipe_error(temperature):
    with pytest.raises(RecipeError, match=rf"objective\.temperature: must be > 0, found {temperature}"):
        tiny_graph("sigprop", {"temperature": temperature})


@pytest.mark.parametrize("key, value", [("predict", "goodness"), ("score", "dot"), ("seed", "x")])
def test_bad_stream_options_are_recipe_errors_at_model_streams(key, value):
    with pytest.raises(RecipeError, match=rf"model\.streams\.{key}"):
        tiny_graph("sigprop", streams={"name": "sigprop", key: value})


def test_an_unknown_loss_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"objective\.loss"):
        tiny_graph("sigprop", {"loss": "l1"})


@pytest.mark.integration
def test_a_short_mnist_run_beats_chance(tmp_path, monkeypatch):
    """One epoch on 2,000 real MNIST samples: the detached head on sigprop features beats chance clearly."""
    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found under {SHARED_DATA}")
    import layerwise as lw

    monkeypatch.setenv("LAYERWISE_DATA", str(tmp_path / "cache"))  # decoded cache here; MNIST read from the mirror
    run = lw.train("mnist_sigprop", ["data.train_limit=2000", "train.epochs=1", "train.device=cpu",
                                        "model.streams.predict=head"],
                   runs_dir=tmp_path / "runs")
    print(f"mnist_sigprop, 1 epoch on 2,000 samples: test_acc {run.final['test_acc']:.4f}")
    assert run.final["test_acc"] > 0.30, run.final
