"""The command line as a user meets it: help, validate, recipes, plugins and one-line errors."""

from __future__ import annotations

import pytest

from layerwise.shipped import shipped_recipes
from tests.helpers import assert_one_line_error

COMMANDS = [[], ["train"], ["eval"], ["validate"], ["recipes"], ["recipes", "ls"], ["recipes", "cp"], ["plugins"],
            ["new-plugin"], ["compare"], ["tune"], ["probe"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(cli, command):
    result = cli(*command, "--help")
    assert result.code == 0
    assert "Usage" in result.out and len(result.out.splitlines()) > 5


def test_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.out.startswith("layerwise ")


def test_validate_a_shipped_recipe_by_path_and_by_name(cli):
    by_path = cli("validate", "recipes/mnist_hybrid.yaml")
    by_name = cli("validate", "mnist_hybrid", "train.epochs=2")
    for result in (by_path, by_name):
        assert result.code == 0, result.err
        assert "ok" in result.out and "local blocks: hsic1, hsic2" in result.out


def test_validate_reports_every_problem_without_traceback(cli, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ndata: {dataset: mnist, batch_size: -1}\nmodel: {subnetworks: []}\nsed: 1\n")
    result = cli("validate", str(path))
    assert_one_line_error(result, str(path), "data.batch_size: expected a value > 0, found -1",
                          "sed: unknown key (did you mean 'seed'?)")


def test_not_yaml_is_one_line(cli, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [a\n")
    assert_one_line_error(cli("validate", str(path)), "broken.yaml: not valid YAML at line")


def test_unknown_shipped_recipe_suggests_one(cli):
    assert_one_line_error(cli("train", "mnist_hybird"), "did you mean 'mnist_hybrid'?")


def test_recipes_ls_lists_shipped_recipes_with_their_description(cli):
    result = cli("recipes", "ls")
    assert result.code == 0
    for name in shipped_recipes():
        assert name in result.out
    assert "Birjais" in result.out


def test_recipes_cp_copies_and_never_overwrites(cli, tmp_path):
    result = cli("recipes", "cp", "mnist_hsic", str(tmp_path))
    assert result.code == 0
    copied = tmp_path / "mnist_hsic.yaml"
    assert copied.read_text() == shipped_recipes()["mnist_hsic"].read_text()
    assert_one_line_error(cli("recipes", "cp", "mnist_hsic", str(copied)), "already exists")
    assert_one_line_error(cli("recipes", "cp", "mnist_hsci", str(tmp_path)), "did you mean 'mnist_hsic'?")


def test_plugins_lists_the_builtins_with_what_they_provide(cli):
    result = cli("plugins")
    assert result.code == 0
    assert "layerwise.builtins" in result.out
    for item in ("objectives backprop, nhsic, none", "layers avgpool", "datasets cifar10"):
        assert item in result.out
    import json

    rows = {row["name"]: row for row in json.loads(cli("plugins", "--json").out)}
    builtins = rows["layerwise.builtins"]
    assert builtins["status"] == "ok" and builtins["error"] is None
    assert {"nhsic", "none", "backprop"} <= set(builtins["objectives"])
    assert "conv2d" in builtins["layers"] and "cifar10" in builtins["datasets"]


def test_eval_of_a_missing_checkpoint(cli, tmp_path):
    assert_one_line_error(cli("eval", str(tmp_path / "nothing.safetensors")), "no checkpoint there")


def test_eval_without_runs(cli, tmp_path):
    assert_one_line_error(cli("eval", "--runs-dir", str(tmp_path)), "latest does not exist")


@pytest.mark.parametrize("noise, message", [("-1", "must be in [0, 1]"), ("0.5,abc", "found 'abc'")])
def test_eval_rejects_bad_noise_before_loading_anything(cli, tmp_path, noise, message):
    assert_one_line_error(cli("eval", str(tmp_path / "absent"), "--noise", noise), "--noise", message)


def test_missing_dataset_names_the_files_and_where_to_put_them(cli, tmp_path, monkeypatch):
    import layerwise.data

    monkeypatch.setattr(layerwise.data, "MIRROR_DIRS", [])
    result = cli("train", "mnist_hybrid", "--data-root", str(tmp_path / "empty"), "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, "train-images-idx3-ubyte.gz", "--data-root")
    assert not (tmp_path / "runs").exists(), "nothing is created before the data is found"
