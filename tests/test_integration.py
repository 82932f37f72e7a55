"""End to end on real MNIST: train the paper's hybrid network, then evaluate it under noise."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch of recipes/mnist_hybrid.yaml through the real CLI; shared by the tests below."""
    import os
    import sys

    from layerwise.cli import main
    from tests.helpers import SHARED_DATA, real_mnist_present

    if not real_mnist_present():
        pytest.skip(f"real MNIST not found under {SHARED_DATA}")
    runs = tmp_path_factory.mktemp("runs")
    argv = sys.argv
    os.environ.setdefault("LAYERWISE_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))
    sys.argv = ["layerwise", "train", "recipes/mnist_hybrid.yaml", "train.epochs=1", "train.device=cpu",
                "--runs-dir", str(runs), "--no-progress"]
    try:
        with pytest.raises(SystemExit) as done:
            main()
            raise SystemExit(0)
    finally:
        sys.argv = argv
    assert done.value.code in (0, None)
    return runs


def test_one_epoch_of_the_hybrid_reaches_95_percent(trained_run):
    run = (trained_run / "latest").resolve()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record["test_acc"] >= 0.95, record
    for block in ("hsic1", "hsic2"):
        metrics = record["blocks"][block]
        assert set(metrics) == {"loss", "hsic_zx", "hsic_zy"}
        assert metrics["loss"] == pytest.approx(metrics["hsic_zx"] - 100 * metrics["hsic_zy"], rel=1e-3)
    assert "bp1" not in record["blocks"], "backprop blocks have no local loss"


def test_run_folder_holds_everything(trained_run):
    run = (trained_run / "latest").resolve()
    assert run.name.startswith("mnist_hybrid-")
    for name in ("recipe.yaml", "env.json", "metrics.jsonl", "model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "eval").is_dir()
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 0 and env["device"] == "cpu" and "torch" in env
    assert "epochs: 1" in (run / "recipe.yaml").read_text(), "the resolved recipe includes overrides"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "no temporary files left"


def test_eval_latest_with_a_noise_sweep(trained_run, cli):
    result = cli("eval", "--runs-dir", str(trained_run), "--noise", "0.05,0.5", "--device", "cpu", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    levels = [row["noise"] for row in report["results"]]
    assert levels == [0.0, 0.05, 0.5]
    accs = [row["acc"] for row in report["results"]]
    assert accs[0] >= 0.95
    assert accs[2] < accs[0], "strong noise must cost accuracy"
    saved = json.loads(((trained_run / "latest") / "eval" / "noise-latest.json").read_text())
    assert saved["results"] == report["results"]


def test_eval_is_reproducible_and_takes_a_checkpoint_path(trained_run, cli):
    checkpoint = (trained_run / "latest" / "model.safetensors").resolve()
    first = cli("eval", str(checkpoint), "--noise", "0.5", "--json", "--device", "cpu")
    second = cli("eval", str(checkpoint), "--noise", "0.5", "--json", "--device", "cpu", "--batch-size", "333")
    assert first.code == 0 and second.code == 0
    a, b = json.loads(first.out)["results"], json.loads(second.out)["results"]
    # Identical noisy images give identical predictions; only the summed loss may round differently.
    assert [row["acc"] for row in a] == [row["acc"] for row in b]
    assert [row["loss"] for row in a] == pytest.approx([row["loss"] for row in b], rel=1e-5)


def test_eval_prints_a_table(trained_run, cli):
    result = cli("eval", "--runs-dir", str(trained_run), "--noise", "0.5", "--device", "cpu")
    assert result.code == 0
    assert "test accuracy" in result.out and "0.5" in result.out and "Report:" in result.out
