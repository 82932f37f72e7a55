"""`layerwise plot`: PNG figures from run folders."""

from __future__ import annotations

import json

import pytest

from layerwise.errors import LayerwiseError
from layerwise.plot import plot_runs
from tests.helpers import block_imports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root, name, accs, noise=None):
    run = root / name
    (run / "eval").mkdir(parents=True)
    lines = [json.dumps({"epoch": i + 1, "test_acc": acc}) for i, acc in enumerate(accs)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if noise:
        report = {"results": [{"noise": s, "acc": a} for s, a in noise]}
        (run / "eval" / "noise-latest.json").write_text(json.dumps(report))
    return run


def test_plots_accuracy_and_noise_curves(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path, "a", [0.9, 0.95], noise=[(0.0, 0.95), (0.5, 0.7)])
    b = fake_run(tmp_path, "b", [0.8, 0.85, 0.9])
    written = plot_runs([a, b], tmp_path / "plots")
    assert [p.name for p in written] == ["accuracy.png", "noise.png"]
    for path in written:
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_no_noise_figure_without_eval_reports(tmp_path):
    pytest.importorskip("matplotlib")
    written = plot_runs([fake_run(tmp_path, "a", [0.5])], tmp_path / "plots")
    assert [p.name for p in written] == ["accuracy.png"]


def test_a_folder_that_is_not_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(LayerwiseError, match="not a run folder"):
        plot_runs([tmp_path], tmp_path / "plots")


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    block_imports(monkeypatch, "matplotlib")
    with pytest.raises(LayerwiseError, match=r"pip install 'layerwise\[plot\]'"):
        plot_runs([fake_run(tmp_path, "a", [0.5])], tmp_path / "plots")
