"""`layerwise compare`: one table of run folders, seeds grouped into mean ± std.

Run folders are written directly (recipe.yaml, metrics.jsonl, eval/noise-latest.json) so these
tests train nothing; one integration test trains two seeds on real MNIST and compares them.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, block_imports, tiny_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_PARAMS = 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


def make_run(root: Path, name: str, accs=(0.5,), *, seed: int = 0, epochs: int | None = None, val=None,
             noise=None, noise_epoch: int | None = None, seconds: float = 2.0, recipe: dict | None = None,
             normalized=None, normalized_epoch: int | None = None) -> Path:
    """A run folder as training leaves it, without training: test accuracy ``accs[i]`` at epoch i+1;
    ``noise`` and ``normalized``: the latest eval reports' (std, accuracy) in pixel and normalized space."""
    from layerwise.factory import parse_recipe
    from layerwise.recipe import dump_recipe

    data = copy.deepcopy(recipe) if recipe is not None else tiny_recipe()
    data["seed"] = seed
    data["train"]["epochs"] = epochs if epochs is not None else len(accs)
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "recipe.yaml").write_text(dump_recipe(parse_recipe(data, name)))
    (run / "env.json").write_text("{}\n")
    lines = []
    for i, acc in enumerate(accs):
        record = {"epoch": i + 1, "train_acc": acc, "global_loss": 1.0, "blocks": {"hsic1": {"loss": -0.1}},
                  "test_acc": acc, "test_loss": 1.0, "train_seconds": seconds}
        if val is not None:
            record["val_acc"] = val[i]
        lines.append(json.dumps(record) + "\n")
    (run / "metrics.jsonl").write_text("".join(lines))
    if noise is not None:  # as layerwise eval wrote them before it recorded the space
        report = {"recipe": data["name"], "dataset": "mnist", "train_noise": 0.0,
                  "epoch": noise_epoch if noise_epoch is not None else len(accs),
                  "results": [{"noise": s, "acc": a, "loss": 1.0} for s, a in noise]}
        (run / "eval" / "noise-latest.json").write_text(json.dumps(report))
    if normalized is not None:
        report = {"recipe": data["name"], "dataset": "mnist", "train_noise": 0.0, "noise_space": "normalized",
                  "epoch": normalized_epoch if normalized_epoch is not None else len(accs),
                  "results": [{"noise": s, "acc": a, "loss": 1.0} for s, a in normalized]}
        (run / "eval" / "noise-normalized-latest.json").write_text(json.dumps(report))
    return run


@pytest.fixture
def seeds(tmp_path):
    """Three seeds of the tiny recipe (final test acc 0.90, 0.92, 0.94), two of them evaluated with noise."""
    root = tmp_path / "runs"
    make_run(root, "tiny-a", (0.80, 0.90), seed=0, seconds=1.0, noise=[(0.0, 0.90), (0.5, 0.60)])
    make_run(root, "tiny-b", (0.85, 0.92), seed=1, seconds=2.0, noise=[(0.0, 0.92), (0.5, 0.70)])
    make_run(root, "tiny-c", (0.95, 0.94), seed=2, seconds=3.0)
    return root


def compare_json(cli, *args: str) -> list[dict]:
    result = cli("compare", *args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_seeds_of_one_recipe_group_into_mean_and_std(cli, seeds):
    (row,) = compare_json(cli, str(seeds / "*"))
    assert row["recipe"] == "tiny" and row["n"] == 3 and row["seeds"] == [0, 1, 2] and row["complete"]
    assert row["test_acc"]["mean"] == pytest.approx(0.92)
    assert row["test_acc"]["std"] == pytest.approx(statistics.stdev([0.90, 0.92, 0.94]))  # sample std: 0.02
    assert row["test_acc"]["std"] == pytest.approx(0.02) and row["test_acc"]["n"] == 3
    assert row["best_test_acc"]["mean"] == pytest.approx((0.90 + 0.92 + 0.95) / 3)  # tiny-c was best at epoch 1
    assert row["train_seconds"]["mean"] == pytest.approx((2 + 4 + 6) / 3)  # the sum over epochs of each run
    assert row["val_acc"] is None and row["best_val_acc"] is None
    assert row["noise"]["0.5"] == {"mean": pytest.approx(0.65), "std": pytest.approx(statistics.stdev([0.6, 0.7])),
                                   "n": 2}
    assert row["epochs"] == 2 and row["planned_epochs"] == 2
    assert row["trains"] == {"hsic1": "nhsic", "bp1": "none", "head": "none"}
    assert row["params"] == TINY_PARAMS
    assert [r["name"] for r in row["runs"]] == ["tiny-a", "tiny-b", "tiny-c"]
    assert row["runs"][0]["noise"] == {"0": 0.90, "0.5": 0.60} and row["runs"][2]["noise"] == {}
    assert row["runs"][1]["test_acc"] == 0.92 and row["runs"][1]["path"] == str((seeds / "tiny-b").resolve())


def test_the_table_shows_mean_and_std_and_noise_columns(cli, seeds):
    result = cli("compare", str(seeds / "*"))
    assert result.code == 0 and not result.err, result.err
    out = result.out
    assert "3 runs, seeds grouped: mean ± std" in out
    for text in ("0, 1, 2", "tiny (3 runs)", "1 nhsic, 2 none", "92.00 ± 2.00",
                 "noise 0 %", "noise 0.5 %", "65.00 ± 7.07", "4.0 ± 2.0 s", f"{TINY_PARAMS:,}"):
        assert text in out, (text, out)
    assert "val %" not in out  # no run holds out a validation set


def test_no_group_shows_every_run_and_runs_without_eval(cli, seeds):
    rows = compare_json(cli, str(seeds / "*"), "--no-group")
    assert [(r["n"], r["seeds"], r["test_acc"]["std"]) for r in rows] == [(1, [0], None), (1, [1], None),
                                                                           (1, [2], None)]
    assert rows[2]["noise"] == {}
    out = cli("compare", str(seeds / "*"), "--no-group").out
    line = next(line for line in out.splitlines() if "tiny-c" in line)
    assert "94.00" in line and line.count(" - ") >= 2, line  # no eval: both noise cells empty


def test_a_different_recipe_is_another_row_that_names_the_difference(cli, seeds):
    other = tiny_recipe()
    other["model"]["subnetworks"][0]["blocks"][0]["objective"]["beta"] = 200
    make_run(seeds, "tiny-beta", (0.5, 0.7), seed=0, recipe=other)
    rows = compare_json(cli, str(seeds / "*"))
    assert [(r["n"], r["differs"]) for r in rows] == [
        (3, {"model.subnetworks.sn1.blocks.hsic1.objective.beta": 100}),
        (1, {"model.subnetworks.sn1.blocks.hsic1.objective.beta": 200})]
    out = cli("compare", str(seeds / "*")).out
    assert "differs" in out and "hsic1.objective.beta=100" in out and "hsic1.objective.beta=200" in out


def test_defaults_written_out_or_left_implicit_are_the_same_recipe(cli, tmp_path):
    explicit = tiny_recipe()
    explicit["model"]["subnetworks"][0]["blocks"][0]["objective"] = {"name": "nhsic", "sigma": 5.0, "beta": 100,
                                                                     "normalization": "cca"}
    explicit["model"]["subnetworks"][0]["blocks"][1]["objective"] = "backprop"
    explicit["name"] = "renamed"
    make_run(tmp_path, "a", (0.5,), seed=0)
    make_run(tmp_path, "b", (0.7,), seed=1, recipe=explicit)
    (row,) = compare_json(cli, str(tmp_path / "a"), str(tmp_path / "b"))
    assert row["n"] == 2 and row["recipe"] == "tiny, renamed" and row["differs"] == {}


def test_a_run_logged_to_tensorboard_groups_with_its_seeds(cli, tmp_path):
    logged = tiny_recipe()
    logged["train"]["tensorboard"] = True  # changes what the run writes, not what it trains
    make_run(tmp_path, "a", (0.5,), seed=0, recipe=logged)
    make_run(tmp_path, "b", (0.7,), seed=1)
    (row,) = compare_json(cli, str(tmp_path / "a"), str(tmp_path / "b"))
    assert row["n"] == 2 and row["seeds"] == [0, 1]


def test_sort_keys(cli, tmp_path):
    make_run(tmp_path, "slow", (0.7,), seconds=9.0, val=(0.60,), noise=[(0.5, 0.2)])
    make_run(tmp_path, "best", (0.9,), seconds=5.0, val=(0.65,))
    make_run(tmp_path, "fast", (0.8,), seconds=1.0, val=(0.70,), noise=[(0.5, 0.4)])

    def order(*sort: str) -> list[str]:
        return [r["runs"][0]["name"] for r in compare_json(cli, str(tmp_path / "*"), "--no-group", *sort)]

    assert order() == ["best", "fast", "slow"]  # as the pattern matched: by name
    assert order("--sort", "test_acc") == ["best", "fast", "slow"]
    assert order("--sort", "best_val_acc") == ["fast", "best", "slow"]
    assert order("--sort", "train_seconds") == ["fast", "best", "slow"]
    assert order("--sort", "noise:0.5") == ["fast", "slow", "best"]  # best first, runs without eval last
    assert order("--sort", "name") == ["best", "fast", "slow"]
    assert "best val %" in cli("compare", str(tmp_path / "*"), "--no-group").out
    assert_one_line_error(cli("compare", str(tmp_path / "*"), "--sort", "accuracy"),
                          "--sort accuracy: unknown key; expected one of name, test_acc")
    assert_one_line_error(cli("compare", str(tmp_path / "*"), "--sort", "noise:0.3"),
                          "--sort noise:0.3: no run has an eval result at noise 0.3; levels found: 0.5")


# --------------------------------------------------------------------------- noise spaces


@pytest.fixture
def spaces(tmp_path):
    """Two seeds evaluated in both noise spaces (normalized noise 0.5 costs less than pixel 0.5 here)
    and a third in pixel space only."""
    root = tmp_path / "runs"
    make_run(root, "tiny-a", (0.90,), seed=0, noise=[(0.0, 0.90), (0.5, 0.60)],
             normalized=[(0.0, 0.90), (0.5, 0.80), (1.0, 0.40)])
    make_run(root, "tiny-b", (0.92,), seed=1, noise=[(0.0, 0.92), (0.5, 0.70)], normalized=[(0.0, 0.92), (0.5, 0.84)])
    make_run(root, "tiny-c", (0.94,), seed=2, noise=[(0.0, 0.94), (0.5, 0.50)])
    return root


def test_normalized_space_reports_are_shown_apart_from_pixel_ones(cli, spaces):
    (row,) = compare_json(cli, str(spaces / "*"))
    assert row["noise"]["0.5"]["mean"] == pytest.approx(0.60) and row["noise"]["0.5"]["n"] == 3  # pixel, unmixed
    assert set(row["noise_normalized"]) == {"0", "0.5", "1"}
    assert row["noise_normalized"]["0.5"] == {"mean": pytest.approx(0.82),
                                              "std": pytest.approx(statistics.stdev([0.80, 0.84])), "n": 2}
    assert row["noise_normalized"]["1"] == {"mean": pytest.approx(0.40), "std": None, "n": 1}
    a, _, c = row["runs"]
    assert a["noise"] == {"0": 0.90, "0.5": 0.60} and a["noise_normalized"] == {"0": 0.90, "0.5": 0.80, "1": 0.40}
    assert a["noise_epoch"] == 1 and a["noise_normalized_epoch"] == 1
    assert c["noise_normalized"] == {} and c["noise_normalized_epoch"] is None

    header, cells = table_row(cli("compare", str(spaces / "*")).out, "tiny (3 runs)")
    assert header[header.index("noise 0 %"):header.index("train time")] == [
        "noise 0 %", "noise 0.5 %", "normalized noise 0 %", "normalized noise 0.5 %", "normalized noise 1 %"]
    assert cells[header.index("noise 0.5 %")] == "60.00 ± 10.00"
    assert cells[header.index("normalized noise 0.5 %")] == "82.00 ± 2.83"
    assert cells[header.index("normalized noise 1 %")] == "40.00"


def table_row(out: str, first_cell: str) -> tuple[list[str], list[str]]:
    """The column titles of a printed compare table, and the cells of the row that starts with ``first_cell``
    (its first line: titles and cells must fit one line each, so the table must be wide enough)."""
    lines = [line for line in out.splitlines() if "┃" in line or "│" in line]
    header = [cell.strip() for cell in lines[0].strip("┃").split("┃")]
    row = next(line for line in lines if line.strip("│").split("│")[0].strip() == first_cell)
    return header, [cell.strip() for cell in row.strip("│").split("│")]


def test_pixel_only_runs_look_as_before(cli, seeds):
    out = cli("compare", str(seeds / "*")).out
    assert "normalized" not in out
    header, _ = table_row(out, "tiny (3 runs)")
    assert header == ["run", "seed", "trains", "epochs", "test %", "best test %", "noise 0 %", "noise 0.5 %",
                      "train time", "params"]
    (row,) = compare_json(cli, str(seeds / "*"))
    assert row["noise_normalized"] == {} and all(run["noise_normalized"] == {} for run in row["runs"])


def test_sort_by_a_normalized_space_result(cli, spaces):
    def order(*sort: str) -> list[str]:
        return [r["runs"][0]["name"] for r in compare_json(cli, str(spaces / "*"), "--no-group", *sort)]

    assert order("--sort", "noise:0.5") == ["tiny-b", "tiny-a", "tiny-c"]
    assert order("--sort", "noise-normalized:0.5") == ["tiny-b", "tiny-a", "tiny-c"]
    assert order("--sort", "noise-normalized:1") == ["tiny-a", "tiny-b", "tiny-c"]  # without the result: last
    assert_one_line_error(cli("compare", str(spaces / "*"), "--sort", "noise-normalized:0.3"),
                          "--sort noise-normalized:0.3: no run has an eval result at noise 0.3 in normalized space; "
                          "levels found: 0, 0.5, 1")
    assert_one_line_error(cli("compare", str(spaces / "*"), "--sort", "noise-normalized:x"),
                          "--sort noise-normalized:x: expected noise-normalized:LEVEL with a number")


def test_a_normalized_report_that_is_not_one_is_refused(cli, spaces):
    report = spaces / "tiny-a" / "eval" / "noise-normalized-latest.json"
    data = json.loads(report.read_text())
    report.write_text(json.dumps({**data, "noise_space": "pixel"}))
    assert_one_line_error(cli("compare", str(spaces / "*")),
                          f"{report}: noise_space: expected 'normalized' (as the file's name says), found 'pixel'",
                          "--noise-space normalized' again or delete it")
    report.write_text(json.dumps({**data, "results": [{"noise": 0.5, "acc": 80}]}))  # a percentage
    assert_one_line_error(cli("compare", str(spaces / "*")), f"{report}: not an eval report",
                          "each acc in [0, 1]")


def test_a_stale_normalized_report_is_named_with_its_option(cli, tmp_path):
    run = make_run(tmp_path, "a", (0.5, 0.6), normalized=[(0.5, 0.3)], normalized_epoch=1)
    result = cli("compare", str(run))
    assert result.code == 0
    assert (f"{run / 'eval' / 'noise-normalized-latest.json'}: evaluates epoch 1, and the run has 2; "
            f"run 'layerwise eval {run} --noise-space normalized' again") in " ".join(result.err.split())


def test_plot_writes_a_png_with_test_and_validation_curves(cli, tmp_path):
    pytest.importorskip("matplotlib")
    make_run(tmp_path / "runs", "a", (0.5, 0.6), val=(0.4, 0.5))
    make_run(tmp_path / "runs", "b", (0.55, 0.65), seed=1, val=(0.45, 0.55))
    target = tmp_path / "figs" / "compare.png"
    result = cli("compare", str(tmp_path / "runs" / "*"), "--plot", str(target))
    assert result.code == 0, result.err
    assert target.read_bytes().startswith(PNG_MAGIC) and f"Wrote {target}" in result.out
    with_json = cli("compare", str(tmp_path / "runs" / "*"), "--plot", str(target), "--json")
    assert json.loads(with_json.out)[0]["n"] == 2 and "Wrote" in with_json.err  # stdout stays JSON
    assert_one_line_error(cli("compare", str(tmp_path / "runs" / "*"), "--plot", str(tmp_path / "x.txt")),
                          "x.txt: give a file name ending in .png")


def test_plot_without_matplotlib_says_how_to_install(cli, tmp_path, monkeypatch):
    make_run(tmp_path, "a")
    block_imports(monkeypatch, "matplotlib")
    assert_one_line_error(cli("compare", str(tmp_path / "a"), "--plot", str(tmp_path / "c.png")),
                          "pip install 'layerwise[plot]'")
    assert not (tmp_path / "c.png").exists()


def test_nothing_matched_is_an_error(cli, tmp_path):
    result = cli("compare", str(tmp_path / "nothing-*"))
    assert_one_line_error(result, "no run folder in", "nothing-*")
    assert result.err.startswith("error:")  # the error alone, no warning before it
    assert_one_line_error(cli("compare", str(tmp_path / "missing")), "missing: no such run folder")
    assert_one_line_error(cli("compare", "--runs-dir", str(tmp_path / "none")), "no run folder in")


def test_folders_that_are_not_runs_are_skipped_with_a_warning(cli, tmp_path):
    root = tmp_path / "runs"
    make_run(root, "tiny-a")
    (root / "notes").mkdir()
    (root / "notes.txt").write_text("hello")
    result = cli("compare", str(root / "*"), str(root / "other-*"), "--json")
    assert result.code == 0 and len(json.loads(result.out)) == 1
    warnings = result.err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning:") for w in warnings)
    assert [("not a run folder" in w, "other-*: matches nothing" in w) for w in warnings] == [
        (True, False), (True, False), (False, True)]
    # the runs folder itself: a hint at the pattern meant
    result = cli("compare", str(root))
    assert_one_line_error(result, "no run folder in")
    assert f"did you mean '{root / '*'}'?" in result.err


def test_latest_and_the_folder_it_points_at_are_one_run(cli, tmp_path):
    from layerwise.runs import point_latest

    root = tmp_path / "runs"
    make_run(root, "tiny-a", seed=0)
    make_run(root, "tiny-b", seed=1)
    point_latest(root, root / "tiny-b")
    (row,) = compare_json(cli, "--runs-dir", str(root))  # default: every run under --runs-dir, latest included
    assert [r["name"] for r in row["runs"]] == ["tiny-a", "tiny-b"]
    (row,) = compare_json(cli, str(root / "latest"))
    assert [r["name"] for r in row["runs"]] == ["tiny-b"]


def test_incomplete_and_empty_runs_are_shown_marked_and_never_grouped(cli, tmp_path):
    make_run(tmp_path, "done-a", (0.5, 0.6, 0.7), seed=0)
    make_run(tmp_path, "done-b", (0.5, 0.6, 0.8), seed=1)
    make_run(tmp_path, "stopped", (0.5,), seed=2, epochs=3)
    make_run(tmp_path, "just-started", (), seed=3, epochs=3)
    rows = compare_json(cli, str(tmp_path / "*"))
    assert [(r["n"], r["complete"], r["epochs"]) for r in rows] == [(2, True, 3), (1, False, 0), (1, False, 1)]
    assert rows[1]["test_acc"] is None and rows[1]["runs"][0]["name"] == "just-started"
    out = cli("compare", str(tmp_path / "*")).out
    assert "1/3" in out and "0/3" in out and "2 incomplete" in out


def test_a_damaged_file_is_one_line_naming_it(cli, tmp_path):
    run = make_run(tmp_path, "a", (0.5, 0.6))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "test_a')
    assert_one_line_error(cli("compare", str(run)), f"{run / 'metrics.jsonl'}: line 3 is not an epoch record")
    run = make_run(tmp_path, "b", (0.5,))
    record = json.loads((run / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").write_text(json.dumps({**record, "test_acc": "high"}) + "\n")
    assert_one_line_error(cli("compare", str(run)), "line 1: test_acc: expected a number in [0, 1], found 'high'")
    run = make_run(tmp_path, "c", (0.5,), noise=[(0.5, 0.3)])
    (run / "eval" / "noise-latest.json").write_text("{not json")
    assert_one_line_error(cli("compare", str(run)), f"{run / 'eval' / 'noise-latest.json'}: not a readable eval report")
    run = make_run(tmp_path, "d", (0.5,))
    (run / "recipe.yaml").write_text("model: [unclosed")
    assert_one_line_error(cli("compare", str(run)), f"{run / 'recipe.yaml'}: not valid YAML")


def test_a_stale_eval_report_is_named(cli, tmp_path):
    run = make_run(tmp_path, "a", (0.5, 0.6), noise=[(0.5, 0.3)], noise_epoch=1)
    result = cli("compare", str(run), "--json")
    assert result.code == 0 and json.loads(result.out)[0]["runs"][0]["noise_epoch"] == 1
    assert "evaluates epoch 1, and the run has 2" in result.err


def test_a_recipe_that_no_longer_validates_is_shown_as_written(cli, tmp_path):
    """A run trained with a plugin's objective, after the plugin was uninstalled: shown, with a warning,
    and its parameters counted from the weights' header (batch-norm buffers left out)."""
    import torch
    from safetensors.torch import save_file

    run = make_run(tmp_path, "a", (0.5,))
    text = (run / "recipe.yaml").read_text().replace("name: nhsic", "name: gone_plugin_objective")
    (run / "recipe.yaml").write_text(text)
    save_file({"blocks.hsic1.body.0.weight": torch.zeros(32, 784), "blocks.hsic1.body.0.bias": torch.zeros(32),
               "blocks.hsic1.body.1.running_mean": torch.zeros(32),
               "blocks.hsic1.body.1.num_batches_tracked": torch.zeros((), dtype=torch.long)},
              str(run / "model.safetensors"))
    result = cli("compare", str(run), "--json")
    assert result.code == 0, result.err
    (row,) = json.loads(result.out)
    assert row["trains"] == {"hsic1": "gone_plugin_objective", "bp1": "none", "head": "none"}
    assert row["params"] == 32 * 784 + 32 and row["test_acc"]["mean"] == 0.5
    assert "recipe.yaml: not valid here" in result.err and "gone_plugin_objective" in result.err


@pytest.mark.integration
def test_compare_two_trained_seeds(cli, tmp_path, mnist_available):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(tiny_recipe(train_limit=256)))
    runs = tmp_path / "runs"
    for seed in (0, 1):
        result = cli("train", str(recipe), f"seed={seed}", "--runs-dir", str(runs), "--no-progress")
        assert result.code == 0, result.err
    result = cli("eval", str(runs / "latest"), "--noise", "0,0.5", "--runs-dir", str(runs), "--no-progress")
    assert result.code == 0, result.err
    rows = compare_json(cli, str(runs / "*"))
    (row,) = rows
    accs = [r["test_acc"] for r in row["runs"]]
    assert row["n"] == 2 and sorted(row["seeds"]) == [0, 1] and row["complete"] and row["params"] == TINY_PARAMS
    assert row["test_acc"]["mean"] == pytest.approx(statistics.mean(accs))
    assert row["test_acc"]["std"] == pytest.approx(statistics.stdev(accs))
    assert row["noise"]["0.5"]["n"] == 1 and row["train_seconds"]["mean"] > 0
    table = cli("compare", str(runs / "*"), "--no-group")
    assert table.code == 0 and "noise 0.5" in table.out and table.out.count("tiny-") == 2


def test_help_and_the_parameter_count_of_a_conv_recipe_match_validate(cli, tmp_path):
    """Batch-norm buffers are not parameters, and blocks without parameters are not listed as trained."""
    assert cli("compare", "--help").code == 0
    recipe = tiny_recipe()
    recipe["model"]["subnetworks"] = [{"name": "s", "blocks": [
        {"name": "conv", "layer": "conv2d", "out": 4, "kernel_size": 3, "act": "relu", "norm": True,
         "objective": {"name": "nhsic", "sigma": 5, "beta": 100}},
        {"name": "pool", "layer": "maxpool", "kernel_size": 2},
        {"name": "flat", "layer": "flatten"},
        {"name": "head", "layer": "linear", "out": 10, "freeze": True}]}]
    run = make_run(tmp_path, "c", (0.5,), recipe=recipe)
    (row,) = compare_json(cli, str(run))
    assert row["trains"] == {"conv": "nhsic", "head": "frozen"}
    assert row["params"] == (4 * 9 + 4) + (2 * 4) + (4 * 13 * 13 * 10 + 10)
    assert f"{row['params']:,} parameters" in cli("validate", str(run / "recipe.yaml")).out
