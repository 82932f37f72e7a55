"""Recipe loading, validation errors and command-line overrides."""

from __future__ import annotations

import pytest
import yaml

from layerwise.errors import LayerwiseError, RecipeError
from layerwise.factory import load_recipe, network_from_recipe, parse_recipe
from layerwise.plugins import registries
from layerwise.shipped import shipped_recipes
from tests.helpers import tiny_recipe


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates_and_builds(name):
    path = shipped_recipes()[name]
    first_lines = path.read_text().splitlines()[:4]
    assert first_lines[0].startswith("# "), "a recipe opens with a comment saying what it is"
    assert any(f"layerwise train recipes/{path.name}" in line for line in first_lines), "and how to launch it"
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    spec = registries().datasets.get(recipe.data.dataset)
    graph = network_from_recipe(recipe, spec.shape, spec.num_classes)
    assert graph.shapes[graph.head] == (spec.num_classes,)


def test_the_paper_networks_are_shipped():
    names = set(shipped_recipes())
    assert {"mnist_hybrid", "mnist_hsic", "mnist_backprop", "fashion_mnist_hybrid", "cifar10_hybrid"} <= names


def test_mnist_hybrid_is_the_papers_network():
    recipe = load_recipe(shipped_recipes()["mnist_hybrid"])
    blocks = recipe.model.blocks()
    assert [b.out for b in blocks] == [512, 256, 128, 10]
    assert [b.objective_name for b in blocks] == ["nhsic", "none", "nhsic", "none"]


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_not_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\nmodel: [unclosed\n  - a: b: c\n")
    with pytest.raises(LayerwiseError, match=r"r\.yaml: not valid YAML at line \d+"):
        load_recipe(path)


def test_missing_file(tmp_path):
    with pytest.raises(LayerwiseError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_key_has_did_you_mean(tmp_path):
    data = tiny_recipe()
    data["train"]["epoch"] = 3
    with pytest.raises(RecipeError, match=r"train\.epoch: unknown key \(did you mean 'epochs'\?\)"):
        load_recipe(write(tmp_path, data))


def test_wrong_type_and_negative_width_are_reported_together(tmp_path):
    data = tiny_recipe()
    data["data"]["batch_size"] = "big"
    data["model"]["subnetworks"][0]["blocks"][1]["out"] = -4
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, data))
    text = str(info.value)
    assert "data.batch_size: expected an integer, found 'big' (str)" in text
    assert "model.subnetworks[0].blocks[1].out: expected a value > 0, found -4" in text
    assert len(info.value.problems) == 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["model"]["subnetworks"][0]["blocks"][0].update(objective={"name": "nhsci"}),
         r"unknown objective 'nhsci' \(did you mean 'nhsic'\?\)"),
        (lambda d: d["data"].update(dataset="mnits"),
         r"data\.dataset: unknown dataset 'mnits' \(did you mean 'mnist'\?\)"),
        (lambda d: d["model"]["subnetworks"][0]["blocks"][0].update(layer="lienar"),
         r"unknown layer 'lienar' \(did you mean 'linear'\?\)"),
        (lambda d: d["model"]["subnetworks"][0]["blocks"][0].update(act="rleu"),
         r"unknown activation 'rleu' \(did you mean 'relu'\?\)"),
        (lambda d: d["model"]["subnetworks"][0]["blocks"][0]["objective"].update(sigma=0),
         r"objective\.sigma: must be > 0"),
        (lambda d: d["model"]["subnetworks"][0]["blocks"][0]["objective"].update(bta=3),
         r"objective\.bta: unknown key \(did you mean 'beta'\?\)"),
        (lambda d: d["model"]["subnetworks"][1]["blocks"][0].update(inputs=["bp2"]),
         r"unknown block 'bp2' \(did you mean 'bp1'\?\)"),
        (lambda d: d["model"]["subnetworks"][0]["blocks"][0].update(inputs=["head"]), r"form a cycle"),
        (lambda d: d["train"].update(device="tpu"), r"train\.device: expected one of 'auto', 'cpu', 'cuda'"),
        (lambda d: d.pop("model"), r"model: required key is missing"),
    ],
)
def test_bad_recipes_name_the_key_path(edit, message):
    data = tiny_recipe()
    edit(data)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data, "bad.yaml")


def test_backprop_is_an_alias_of_none():
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][1]["objective"] = "backprop"
    recipe = parse_recipe(data, "t")
    assert registries().objectives.get("backprop") is registries().objectives.get("none")
    assert recipe.model.blocks()[1].objective_name == "backprop"


def test_overrides_set_values_by_path_index_and_name():
    recipe = parse_recipe(
        tiny_recipe(),
        "t",
        ["train.epochs=3", "data.batch_size=128", "model.subnetworks.sn1.blocks.hsic1.objective.beta=7",
         "model.subnetworks.0.blocks.1.out=8", "optim.global.lr=0.01"],
    )
    assert recipe.train.epochs == 3
    assert recipe.data.batch_size == 128
    assert recipe.model.blocks()[0].objective_options["beta"] == 7
    assert recipe.model.blocks()[1].out == 8
    assert recipe.optim.global_.lr == 0.01


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs", r"expected KEY=VALUE"),
        ("train.epochs=many", r"train\.epochs: expected an integer, found 'many'"),
        ("model.subnetworks.sn9.blocks.0.out=3", r"no list item with index or name 'sn9' \(did you mean 'sn\d'\?\)"),
        ("trian.epochs=3", r"trian: unknown key \(did you mean 'train'\?\)"),
        ("name.x=1", r"cannot set 'x' inside str"),
    ],
)
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe(), "t", [override])


def test_resolved_recipe_round_trips_through_plain_data():
    recipe = parse_recipe(tiny_recipe(), "t", ["optim.local.lr=0.5"])
    again = parse_recipe(recipe.to_dict(), "again")
    assert again == recipe
    assert "global" in recipe.to_dict()["optim"]


def test_numbers_in_exponent_form_without_a_dot_are_numbers():
    # PyYAML reads 1e-4 as a string; users write it anyway.
    recipe = parse_recipe(tiny_recipe(), "t", ["optim.local.lr=1e-4"])
    assert recipe.optim.local.lr == 1e-4


@pytest.mark.parametrize("value", ["nan", ".inf", "fast"])
def test_non_finite_or_non_numeric_floats_are_rejected(value):
    with pytest.raises(RecipeError, match=r"optim\.local\.lr: expected a number"):
        parse_recipe(tiny_recipe(), "t", [f"optim.local.lr={value}"])
