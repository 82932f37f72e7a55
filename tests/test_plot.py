"""`layerwise plot`: PNG figures from run folders."""

from __future__ import annotations

import json

import pytest

import layerwise.plot
from layerwise.errors import LayerwiseError
from layerwise.plot import plot_runs
from tests.helpers import assert_one_line_error, block_imports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root, name, accs, noise=None, normalized=None):
    run = root / name
    (run / "eval").mkdir(parents=True)
    lines = [json.dumps({"epoch": i + 1, "train_acc": acc, "global_loss": 1.0, "blocks": {}, "test_acc": acc,
                         "test_loss": 1.0, "train_seconds": 1.0}) for i, acc in enumerate(accs)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if noise:
        report = {"results": [{"noise": s, "acc": a} for s, a in noise]}
        (run / "eval" / "noise-latest.json").write_text(json.dumps(report))
    if normalized:  # layerwise eval --noise-space normalized
        report = {"noise_space": "normalized", "results": [{"noise": s, "acc": a} for s, a in normalized]}
        (run / "eval" / "noise-normalized-latest.json").write_text(json.dumps(report))
    return run


@pytest.fixture
def drawn(monkeypatch):
    """Each figure plot_runs draws, by file name: (its curves, x label, title); still drawn for real."""
    figures = {}
    real = layerwise.plot.draw

    def draw(series, path, xlabel, title):
        figures[path.name] = (series, xlabel, title)
        return real(series, path, xlabel, title)

    monkeypatch.setattr(layerwise.plot, "draw", draw)
    return figures


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


def test_normalized_space_reports_get_a_figure_of_their_own(tmp_path, drawn):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path, "a", [0.9], noise=[(0.0, 0.9), (0.5, 0.6)], normalized=[(0.0, 0.9), (0.5, 0.8)])
    b = fake_run(tmp_path, "b", [0.8], normalized=[(0.0, 0.8), (1.0, 0.3)])
    c = fake_run(tmp_path, "c", [0.7], noise=[(0.0, 0.7), (0.5, 0.4)])
    written = plot_runs([a, b, c], tmp_path / "plots")
    assert [p.name for p in written] == ["accuracy.png", "noise.png", "noise-normalized.png"]
    assert all(path.read_bytes().startswith(PNG_MAGIC) for path in written)
    assert drawn["noise.png"] == ({"a": ([0.0, 0.5], [0.9, 0.6]), "c": ([0.0, 0.5], [0.7, 0.4])},
                                  "test noise std (pixel space)", "Robustness to Gaussian noise")
    assert drawn["noise-normalized.png"] == (
        {"a": ([0.0, 0.5], [0.9, 0.8]), "b": ([0.0, 1.0], [0.8, 0.3])}, "test noise std (normalized space)",
        "Robustness to Gaussian noise (normalized space)")


def test_pixel_only_runs_draw_what_they_drew_before(tmp_path, drawn):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path, "a", [0.9], noise=[(0.0, 0.9), (0.5, 0.6)])
    assert [p.name for p in plot_runs([a], tmp_path / "plots")] == ["accuracy.png", "noise.png"]
    assert set(drawn) == {"accuracy.png", "noise.png"}
    assert drawn["noise.png"][1:] == ("test noise std (pixel space)", "Robustness to Gaussian noise")


def test_normalized_reports_alone_draw_no_pixel_figure(tmp_path):
    pytest.importorskip("matplotlib")
    a = fake_run(tmp_path, "a", [0.9], normalized=[(0.0, 0.9), (0.5, 0.8)])
    assert [p.name for p in plot_runs([a], tmp_path / "plots")] == ["accuracy.png", "noise-normalized.png"]


@pytest.mark.parametrize("name, text, message", [
    ("noise-latest.json", "{not json", "not a readable eval report"),
    ("noise-latest.json", '{"results": [{"noise": 0.5, "acc": "high"}]}', "not an eval report"),
    ("noise-normalized-latest.json", '{"results": [{"noise": 0.5, "acc": 0.5}]}',
     "noise_space: expected 'normalized' (as the file's name says), found no such key"),
])
def test_a_damaged_eval_report_is_one_line_and_nothing_is_drawn(cli, tmp_path, name, text, message):
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path, "a", [0.9])
    (run / "eval" / name).write_text(text)
    assert_one_line_error(cli("plot", str(run), "--out", str(tmp_path / "plots")),
                          f"{run / 'eval' / name}: {message}")
    assert not (tmp_path / "plots").exists()
