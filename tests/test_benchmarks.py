"""The benchmark and reproduction scripts, each run in a tiny configuration so they keep working."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration


def load(name: str):
    """Import ``benchmarks/<name>.py`` (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_docs_quote_the_current_measured_tables():
    assert load("sync_docs").main(["--check"]) == 0, "run python benchmarks/sync_docs.py"


@pytest.mark.parametrize("study, only", [("accuracy", "mnist/hybrid"), ("noise", "noise0.5/hsic"),
                                         ("sensitivity", "sigma5/beta100")])
def test_each_study_runs_tiny_and_resumes(tmp_path, mnist_available, study, only, monkeypatch):
    reproduce = load("reproduce")
    args = [study, "--tiny", "--seeds", "0", "--only", only, "--out", str(tmp_path),
            "--runs-dir", str(tmp_path / "runs")]
    reproduce.main(args)
    state = json.loads((tmp_path / f"{study}.json").read_text())
    assert len(state["records"]) == 1
    record = next(iter(state["records"].values()))
    assert 0.0 <= record["test_acc"] <= 1.0 and record["epochs"] == 1
    assert "| " in (tmp_path / f"{study}.md").read_text()
    if study == "accuracy":
        assert (tmp_path / "figures" / "accuracy-mnist.png").read_bytes().startswith(b"\x89PNG")
        assert (tmp_path / "figures" / "noise-mnist.png").exists()

    def must_not_run(*_):
        raise AssertionError("a finished job ran again")

    monkeypatch.setattr(reproduce, "run_job", must_not_run)
    reproduce.main(args)  # resumes: every job is already done


def test_conv_study_runs_tiny(tmp_path):
    from layerwise.data import load_split
    from layerwise.errors import DataError
    from layerwise.plugins import registries

    try:
        load_split(registries().datasets.get("cifar10"), "test")
    except DataError:
        pytest.skip("CIFAR-10 is not on this machine (see README: ../shared/data/cifar10/fetch)")
    load("reproduce").main(["conv", "--tiny", "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    state = json.loads((tmp_path / "conv.json").read_text())
    assert set(state["records"]) == {"cifar10/conv_hybrid/seed0", "cifar10/conv_backprop/seed0"}


def test_speed_benchmark_tiny(tmp_path):
    result = load("speed").main(["--tiny", "--out", str(tmp_path)])
    rows = result["results"]
    # mnist_hsic's layers (5 x 256) differ from mnist_backprop's, so its backprop twin is timed too;
    # mnist_hybrid has mnist_backprop's layers and is compared with it.
    assert set(rows) == {"mnist_backprop", "mnist_hybrid", "mnist_hsic", "mnist_hsic as backprop"}
    assert rows["mnist_backprop"]["vs_backprop"] == 1.0
    assert rows["mnist_hybrid"]["same_widths_backprop"] == "mnist_backprop"
    assert rows["mnist_hsic"]["same_widths_backprop"] == "mnist_hsic as backprop"
    assert rows["mnist_hsic as backprop"]["vs_same_widths_backprop"] == 1.0
    # the dense-algebra floor: none without nhsic blocks, more for five cca blocks than for two
    assert rows["mnist_backprop"]["nhsic_floor_ms"] == 0.0
    assert rows["mnist_hsic"]["nhsic_floor_ms"] > rows["mnist_hybrid"]["nhsic_floor_ms"] > 0
    assert all(row["ms_per_batch"] > 0 for row in rows.values())
    assert (tmp_path / "speed.md").exists()


def test_memory_benchmark_tiny(tmp_path):
    result = load("memory").main(["--depths", "2", "--batch", "32", "--methods", "hsic", "--out", str(tmp_path)])
    assert [(r["method"], r["depth"]) for r in result["rows"]] == [("hsic", 2)]
    assert all(r["peak_mib"] >= 0 for r in result["rows"])


def test_python_snippet_benchmark_tiny(tmp_path):
    state = load("python_snippet").main(["--tiny", "--out", str(tmp_path)])
    validation = {r["batch_size"]: r["acc"] for r in state["records"].values() if r["split"] == "validation"}
    tests = [r for r in state["records"].values() if r["split"] == "test"]
    assert set(validation) == {64, 128} and len(tests) == 1
    assert tests[0]["batch_size"] == max(validation, key=validation.get)  # chosen on validation, not test
    assert 0.2 < tests[0]["acc"] <= 1.0
    assert "--tiny" in (tmp_path / "python-snippet.md").read_text()


def test_pipeline_benchmark_quick(tmp_path, mnist_available):
    # One process and 2 stages only: 4-stage exactness is tests/test_pipeline.py's (mnist_hsic in 4 stages).
    load("pipeline").main(["--quick", "--repeats", "1", "--configs", "a", "c", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "pipeline.json").read_text())
    configurations = result["speed"]["configurations"]
    assert set(configurations) == {"a", "c"}
    assert all(c["median_samples_per_s"] > 0 for c in configurations.values())
    assert configurations["c"]["weights_identical"]
    assert [len(stages) for stages in result["speed"]["bubbles"].values()] == [2]
    rows = result["memory"]["rows"]
    assert [r["stages"] for r in rows] == [1, 2]
    assert all(len(r["stage_peak_mib"]) == r["stages"] and min(r["stage_peak_mib"]) > 0 for r in rows)
    assert result["memory"]["idle_process_mib"] > 0
    assert "weights identical to one process" in (tmp_path / "pipeline.md").read_text()


def test_pipeline_benchmark_reads_the_metrics_log_as_every_reader_does(tmp_path, monkeypatch):
    """Through layerwise.runs.read_metrics: a bad line is one error naming the line and the key
    (it was a KeyError from the benchmark's own json.loads)."""
    from layerwise.errors import LayerwiseError

    pipeline = load("pipeline")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    monkeypatch.setattr(pipeline, "train_once", lambda *args: (tmp_path, 1.0, None))  # as if it had trained
    with pytest.raises(LayerwiseError, match=r"line 1: train_acc: expected a number in \[0, 1\], found no such key"):
        pipeline.timed_run(tmp_path / "recipe.yaml", 1, 1, tmp_path, 64)
