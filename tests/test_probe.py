"""`layerwise probe`: a linear probe and nHSIC per block; `layerwise plot --probes`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from layerwise.errors import LayerwiseError
from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.objectives.base import BlockInfo, LossContext
from layerwise.objectives.nhsic import NHSIC, NHSICConfig
from layerwise.plot import epochs_to_label, information_plane, plot_probes
from layerwise.probe import HSICSettings, batched_nhsic, check_options, fit_probe, hsic_settings, nhsic_terms
from tests.helpers import tiny_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_FIELDS = {"block", "objective", "features", "train_acc", "test_acc", "test_loss", "hsic_zx", "hsic_zy",
              "hsic_kernel", "hsic_sigma", "hsic_normalization", "hsic_from"}


@pytest.mark.parametrize("normalization", ["cca", "cka"])
@pytest.mark.parametrize("kernel", ["gaussian", "cosine", "linear"])
@pytest.mark.parametrize("groups", [0, 4])
def test_nhsic_is_the_objectives_own_estimator(normalization, kernel, groups):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 6, 6, generator=generator)
    y = torch.arange(48) % 10
    z = torch.randn(48, 16, generator=generator)
    config = NHSICConfig(sigma=4.0, normalization=normalization, kernel=kernel, groups=groups)
    objective = NHSIC(config, BlockInfo("b", (36,), (16,), (1, 6, 6), 10))
    _, metrics = objective.loss(z, LossContext(x, y, 10))
    settings = HSICSettings(config, "own objective")
    zx, zy = nhsic_terms(z, x, torch.nn.functional.one_hot(y, 10), settings)
    assert zx == pytest.approx(metrics["hsic_zx"].item(), rel=1e-5)
    assert zy == pytest.approx(metrics["hsic_zy"].item(), rel=1e-5)
    # averaged over batches of 16 (48 = 3 batches), the same numbers as three separate calls
    onehot = torch.nn.functional.one_hot(y, 10)
    parts = [nhsic_terms(z[i:i + 16], x[i:i + 16], onehot[i:i + 16], settings) for i in (0, 16, 32)]
    mean = batched_nhsic(z, x, y, 10, 16, settings)
    assert mean == pytest.approx((sum(p[0] for p in parts) / 3, sum(p[1] for p in parts) / 3))
    assert batched_nhsic(z[:40], x[:40], y[:40], 10, 16, settings) == pytest.approx(
        ((parts[0][0] + parts[1][0]) / 2, (parts[0][1] + parts[1][1]) / 2))  # the incomplete last batch is left out


def test_each_block_is_measured_with_its_own_or_the_first_nhsic_settings():
    data = tiny_recipe()
    data["model"]["subnetworks"][1]["blocks"].insert(0, {"name": "hsic2", "layer": "linear", "out": 8,
                                                         "objective": {"name": "nhsic", "sigma": 7,
                                                                       "normalization": "cka"}})
    settings = hsic_settings(network_from_recipe(parse_recipe(data, "t"), (1, 28, 28), 10))
    assert settings["hsic1"] == HSICSettings(NHSICConfig(sigma=5.0), "own objective")
    assert settings["hsic2"] == HSICSettings(NHSICConfig(sigma=7.0, normalization="cka"), "own objective")
    assert settings["bp1"] == settings["head"] == HSICSettings(NHSICConfig(sigma=5.0), "first nhsic block 'hsic1'")
    data["model"]["subnetworks"][0]["blocks"][0]["objective"]["groups"] = 8  # hsic1: 32 wide
    settings = hsic_settings(network_from_recipe(parse_recipe(data, "t"), (1, 28, 28), 10))
    assert settings["hsic1"] == HSICSettings(NHSICConfig(sigma=5.0, groups=8), "own objective")
    # other blocks borrow hsic1's settings ungrouped: 8 groups would not fit the head's 10 outputs
    assert settings["bp1"] == settings["head"] == HSICSettings(NHSICConfig(sigma=5.0), "first nhsic block 'hsic1'")
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0]["objective"] = "none"
    settings = hsic_settings(network_from_recipe(parse_recipe(data, "t"), (1, 28, 28), 10))
    assert all(value == HSICSettings(NHSICConfig(), "nhsic defaults") for value in settings.values())


def test_the_linear_probe_separates_separable_classes_deterministically():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=generator) * 4
    labels = torch.arange(600) % 3
    features = centres[labels] + torch.randn(600, 20, generator=generator)
    features[:, 5] = 7.0  # a constant feature must not divide by a zero std
    args = (features[:400], labels[:400], features[400:], labels[400:], 3)
    first = fit_probe(*args, epochs=5, batch_size=64)
    assert first["test_acc"] > 0.95 and first["train_acc"] > 0.95 and math.isfinite(first["test_loss"])
    assert fit_probe(*args, epochs=5, batch_size=64) == first
    assert fit_probe(*args, epochs=5, batch_size=64, seed=1) != first


@pytest.mark.parametrize(("options", "message"), [
    ((0, 256, 1e-2, 100, None), "--epochs"), ((1, 0, 1e-2, 100, None), "--batch-size"),
    ((1, 256, 0.0, 100, None), "--lr"), ((1, 256, float("nan"), 100, None), "--lr"),
    ((1, 256, 1e-2, -1, None), "--train-limit"), ((1, 256, 1e-2, 100, 1), "--hsic-batch"),
])
def test_unusable_options_are_refused(options, message):
    with pytest.raises(LayerwiseError, match=message):
        check_options(*options)


# --------------------------------------------------------------------------- plot --probes, on crafted runs


def crafted_run(root, name, blocks=("hsic1", "head"), epochs=3, report=True):
    """A run folder with metrics.jsonl (hsic1 logs nHSIC) and, if ``report``, eval/probe-latest.json."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "train_acc": 0.5, "global_loss": 1.0, "test_acc": min(0.5 + e / 100, 1.0),
                         "test_loss": 1.0, "train_seconds": 1.0,
                         "blocks": {"hsic1": {"loss": -1.0, "hsic_zx": 10.0 + e, "hsic_zy": 5.0 + e / 2}}})
             for e in range(1, epochs + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if report:
        rows = [{"block": b, "test_acc": 0.9 - i / 10, "hsic_zx": 12.0 - i, "hsic_zy": 6.0 - i}
                for i, b in enumerate(blocks)]
        (run / "eval" / "probe-latest.json").write_text(json.dumps({"rows": rows}))
    return run


def test_plot_probes_draws_accuracy_per_block_and_each_runs_information_plane(tmp_path):
    pytest.importorskip("matplotlib")
    a = crafted_run(tmp_path, "a")
    b = crafted_run(tmp_path, "b", blocks=("conv", "hsic1", "fc", "head"), epochs=40)
    written = plot_probes([a, b], tmp_path / "plots")
    assert [p.name for p in written] == ["probes.png", "infoplane-a.png", "infoplane-b.png"]
    for path in written:
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_the_information_plane_reads_the_blocks_that_logged_both_terms():
    history = [{"epoch": 1, "blocks": {"hsic1": {"hsic_zx": 1.0, "hsic_zy": 2.0}, "bp": {"loss": 1.0}}},
               {"epoch": 2, "blocks": {"hsic1": {"hsic_zx": 3.0, "hsic_zy": 4.0}}}]
    assert information_plane(history) == {"hsic1": ([1, 2], [1.0, 3.0], [2.0, 4.0])}
    assert epochs_to_label(4) == {0, 1, 2, 3}
    labelled = epochs_to_label(100)
    assert {0, 99} <= labelled and len(labelled) <= 11


def test_plot_probes_says_how_to_make_a_missing_or_broken_report(tmp_path):
    pytest.importorskip("matplotlib")
    run = crafted_run(tmp_path, "a", report=False)
    with pytest.raises(LayerwiseError, match=f"has no probe report .*layerwise probe {run}"):
        plot_probes([run], tmp_path / "plots")
    (run / "eval" / "probe-latest.json").write_text('{"rows": [{"block": "x"}]}')
    with pytest.raises(LayerwiseError, match="not a probe report"):
        plot_probes([run], tmp_path / "plots")


# --------------------------------------------------------------------------- on real MNIST


@pytest.mark.integration
def test_probe_a_two_block_network_then_plot_it(mnist_available, cli, tmp_path):
    pytest.importorskip("matplotlib")
    data = tiny_recipe(train_limit=512)
    data["model"]["subnetworks"] = [{"name": "sn", "blocks": [
        {"name": "hsic1", "layer": "linear", "out": 32, "act": "relu",
         "objective": {"name": "nhsic", "sigma": 5, "beta": 100}},
        {"name": "head", "layer": "linear", "out": 10}]}]
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert cli("train", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--no-progress").code == 0
    run = (tmp_path / "runs" / "latest").resolve()

    result = cli("probe", str(run), "--train-limit", "512", "--json", "--device", "cpu")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report == json.loads((run / "eval" / "probe-latest.json").read_text())
    assert report["train_samples"] == 512 and report["test_samples"] == 10_000 and report["epoch"] == 1
    assert report["hsic"]["batch_size"] == 64 and report["hsic"]["batches"] == 10_000 // 64  # the run's batch
    assert 0 <= report["model_test_acc"] <= 1
    assert [row["block"] for row in report["rows"]] == ["hsic1", "head"]
    for row in report["rows"]:
        assert set(row) == ROW_FIELDS
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["test_acc"] <= 1
        assert all(math.isfinite(row[key]) for key in ("test_loss", "hsic_zx", "hsic_zy"))
    hsic1, head = report["rows"]
    assert (hsic1["features"], head["features"]) == (32, 10)
    assert (hsic1["hsic_from"], head["hsic_from"]) == ("own objective", "first nhsic block 'hsic1'")
    assert hsic1["test_acc"] > 0.5  # far above chance (0.1), even after one epoch on 512 samples

    table = cli("probe", str(run), "--train-limit", "256", "--epochs", "1", "--hsic-batch", "500", "--no-progress")
    assert table.code == 0, table.err
    text = " ".join(table.out.split())
    assert "hsic1" in text and "head" in text and "20 batches of 500" in text and "Report:" in text

    plotted = cli("plot", str(run), "--probes", "--out", str(tmp_path / "plots"))
    assert plotted.code == 0, plotted.err
    for name in ("accuracy.png", "probes.png", f"infoplane-{run.name}.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.integration
def test_probe_run_from_python_returns_the_rows(mnist_available, tmp_path):
    from layerwise.probe import probe_run
    from tests.helpers import make_finished_run

    run = make_finished_run(tmp_path / "run")  # the tiny recipe's four blocks, stepped once
    rows = probe_run(run, train_limit=256, epochs=1, hsic_batch=250)
    assert [row["block"] for row in rows] == ["hsic1", "bp1", "head"]
    assert all(set(row) == ROW_FIELDS and 0 <= row["test_acc"] <= 1 for row in rows)
    assert not (run / "eval" / "probe-latest.json").exists()  # the Python function writes nothing
