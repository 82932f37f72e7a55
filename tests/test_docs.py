"""The plugin author guide, docs/plugins.md, documents every hook and its code runs as written."""

from __future__ import annotations

import dataclasses
import re
import sys
import types

import pytest
import torch
import typer
import yaml

from layerwise import plugins
from layerwise.factory import parse_recipe
from layerwise.objectives.base import BlockInfo, LossContext
from layerwise.plugin_commands import add_plugin_commands
from layerwise.testing import check_objective, use_plugin
from tests.helpers import PUBLIC_MODULES, REPO

GUIDE = REPO / "docs" / "plugins.md"


def guide_text() -> str:
    return GUIDE.read_text()


def code_blocks(language: str) -> list[str]:
    """Every fenced block of ``language`` in the guide, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", guide_text(), flags=re.M | re.S)


def as_module(source: str, name: str) -> types.ModuleType:
    """Execute ``source`` as module ``name`` (registered in sys.modules, as an import would)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"docs/plugins.md:{name}", "exec"), module.__dict__)
    return module


@pytest.fixture
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


@pytest.mark.parametrize("hook", plugins.HOOK_NAMES)
def test_every_hook_has_a_section_in_the_guide(hook):
    headings = re.findall(r"^#{2,4} .*$", guide_text(), flags=re.M)
    assert any(hook in heading for heading in headings), f"docs/plugins.md has no heading for {hook}"


@pytest.mark.parametrize("cls", [LossContext, BlockInfo])
def test_every_field_of_the_objective_contract_is_documented(cls):
    prefix = "ctx" if cls is LossContext else "info"
    for field in dataclasses.fields(cls):
        assert f"`{prefix}.{field.name}`" in guide_text(), f"{prefix}.{field.name} is not documented"


def plugin_blocks() -> list[str]:
    return [block for block in code_blocks("python") if "@hookimpl" in block]


def worked_example() -> str:
    (block,) = [b for b in plugin_blocks() if b.startswith('"""layerwise_prototype.py')]
    return block


def test_the_worked_example_trains_and_keeps_the_contract(fresh_plugins):
    module = as_module(worked_example(), "layerwise_prototype")
    with use_plugin(module, name="prototype"):
        metrics = check_objective("prototype", {"temperature": 0.1}, plugin="prototype")
        assert set(metrics) == {"loss", "acc"}
        check_objective("prototype", layer="conv2d")


def test_the_worked_example_recipe_validates_and_reports_bad_options(fresh_plugins):
    from layerwise.errors import RecipeError
    from layerwise.factory import network_from_recipe

    (recipe_text,) = [b for b in code_blocks("yaml") if "name: mnist_prototype" in b]
    data = yaml.safe_load(recipe_text)
    with use_plugin(as_module(worked_example(), "layerwise_prototype"), name="prototype"):
        recipe = parse_recipe(data, "guide")
        graph = network_from_recipe(recipe, (1, 28, 28), 10)
        assert [b.name for b in graph.local_blocks()] == ["proto1"]
        data["model"]["subnetworks"][0]["blocks"][0]["objective"]["temperature"] = 0
        message = "model.subnetworks[0].blocks[0].objective.temperature: must be > 0, found 0"
        assert message in guide_text()
        with pytest.raises(RecipeError, match=re.escape(message)):
            parse_recipe(data, "guide")


def test_the_generated_test_shown_in_the_guide_runs(fresh_plugins):
    (test_source,) = [b for b in code_blocks("python") if "def test_prototype_keeps_the_objective_contract" in b]
    with use_plugin(as_module(worked_example(), "layerwise_prototype"), name="prototype"):
        as_module(test_source, "guide_test").test_prototype_keeps_the_objective_contract()


@pytest.mark.parametrize("index", range(len(plugin_blocks())))
def test_every_plugin_snippet_in_the_guide_registers_what_it_promises(fresh_plugins, index, tmp_path):
    module = as_module(plugin_blocks()[index], f"guide_snippet_{index}")
    with use_plugin(module, name=f"snippet{index}"):
        rows = {row["name"]: row for row in plugins.describe_plugins()}
        app = typer.Typer()
        commands = add_plugin_commands(app)
        provided = rows[f"snippet{index}"]
        assert provided["status"] == "ok", provided["error"]
        assert provided["objectives"] or provided["layers"] or provided["datasets"] or commands


def snippet_defining(hook: str) -> types.ModuleType:
    (source,) = [b for b in plugin_blocks() if f"def {hook}(" in b and "layerwise_prototype" not in b]
    return as_module(source, f"guide_{hook}")


def test_the_layer_snippet_builds_a_network(fresh_plugins):
    from layerwise.factory import network_from_recipe
    from tests.helpers import tiny_recipe

    with use_plugin(snippet_defining("layerwise_register_layers"), name="layers-snippet"):
        data = tiny_recipe()
        data["model"]["subnetworks"][0]["blocks"].insert(1, {"name": "ln1", "layer": "layernorm"})
        graph = network_from_recipe(parse_recipe(data, "r"), (1, 28, 28), 10)
        assert graph.shapes["ln1"] == (32,)


def test_the_dataset_snippet_loads_its_files_or_says_where_they_are_missing(fresh_plugins, tmp_path):
    from layerwise.data import load_split
    from layerwise.errors import DataError

    with use_plugin(snippet_defining("layerwise_register_datasets"), name="dataset-snippet"):
        spec = plugins.registries().datasets.get("tinydigits")
        with pytest.raises(DataError, match="tinydigits: train.pt not found"):
            load_split(spec, "train", tmp_path / "empty")
        (tmp_path / "root" / "tinydigits").mkdir(parents=True)
        images = torch.randint(0, 255, (20, 1, 8, 8), dtype=torch.uint8)
        labels = torch.arange(20) % 10
        torch.save((images, labels), tmp_path / "root" / "tinydigits" / "train.pt")
        loaded_images, loaded_labels = load_split(spec, "train", tmp_path / "root")
        assert torch.equal(loaded_images, images) and torch.equal(loaded_labels, labels)


def test_the_command_snippet_runs_through_the_cli(fresh_plugins, monkeypatch, cli):
    from layerwise import cli as cli_module

    monkeypatch.setattr(cli_module.app, "registered_commands", list(cli_module.app.registered_commands))
    cli_module.plugin_commands.cache_clear()
    try:
        with use_plugin(snippet_defining("layerwise_register_commands"), name="command-snippet"):
            assert cli("hello", "--name", "docs").out.strip() == "hello docs"
            error = cli("hello", "--name", " ")
            assert error.code == 2 and "--name: expected a name" in error.err
    finally:
        cli_module.plugin_commands.cache_clear()


def test_the_guide_lists_the_public_api_the_shipped_plugins_rely_on():
    for module in PUBLIC_MODULES:
        assert f"`{module}" in guide_text() or f"from {module} import" in guide_text(), module


def test_the_guide_has_measured_results_for_both_plugin_recipes():
    section = guide_text().split("## Measured results", 1)[1]
    for recipe in ("mnist_localce", "mnist_simmatch"):
        assert f"layerwise train recipes/{recipe}.yaml" in section
    assert "MEASURED_RESULTS" not in section


def test_readme_points_plugin_authors_to_the_guide_and_the_shipped_plugins():
    readme = (REPO / "README.md").read_text()
    plugins_section = readme.split("## Plugins", 1)[1].split("\n## ", 1)[0]
    for needle in ("docs/plugins.md", "layerwise-localce", "layerwise-simmatch", "new-plugin"):
        assert needle in plugins_section
