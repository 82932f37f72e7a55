"""Plugins: discovery, disabling, broken plugins, every hook, and the shipped plugins.

Every hook in layerwise/hookspecs.py needs a test here named ``test_hook_<hook name>...``;
``test_plugin_hooks_have_tests`` fails otherwise. Fake installed plugins are real
distributions: a ``.dist-info`` folder with an ``entry_points.txt`` and a module, put on
``sys.path`` for one test, so discovery runs exactly as it does for ``pip install``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import sys
import textwrap
import types

import pytest
import torch
import typer
from torch import nn

from layerwise import hookimpl, plugins
from layerwise.errors import LayerwiseError
from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.objectives.base import Objective
from layerwise.testing import check_objective, use_plugin
from tests.helpers import PUBLIC_MODULES, REPO, local_objectives, tiny_recipe

PLUGIN_DIRS = sorted(path for path in (REPO / "plugins").iterdir() if (path / "pyproject.toml").is_file())


@pytest.mark.parametrize("hook", plugins.HOOK_NAMES)
def test_plugin_hooks_have_tests(hook):
    tests = [name for name in globals() if name.startswith(f"test_hook_{hook}")]
    assert tests, f"hook {hook} has no test: add test_hook_{hook}_... to tests/test_plugins.py"


def test_hook_names_are_the_specs_the_manager_knows():
    pm = plugins.plugin_manager()
    specified = {name for name in vars(pm.hook) if not name.startswith("_") and getattr(pm.hook, name).has_spec()}
    assert set(plugins.HOOK_NAMES) == specified
    assert "layerwise_register_commands" in specified


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def fresh_plugins():
    """Rediscover plugins before and after the test, so that fakes never leak into other tests."""
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def fresh_commands(monkeypatch, fresh_plugins):
    """Let the CLI load plugin commands again, onto a copy of its command lists."""
    from layerwise import cli

    monkeypatch.setattr(cli.app, "registered_commands", list(cli.app.registered_commands))
    monkeypatch.setattr(cli.app, "registered_groups", list(cli.app.registered_groups))
    cli.plugin_commands.cache_clear()
    yield
    cli.plugin_commands.cache_clear()


@pytest.fixture
def install_fake(tmp_path, monkeypatch, fresh_plugins):
    """``install_fake(dist, entry_name, source)``: a distribution whose entry point loads ``source``."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def install(dist: str, entry_name: str, source: str) -> None:
        module = f"fake_{dist.replace('-', '_')}_{len(modules)}"
        modules.append(module)
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[layerwise]\n{entry_name} = {module}\n")
        plugins.reset()

    yield install
    for module in modules:
        sys.modules.pop(module, None)


GOOD_PLUGIN = """
    from layerwise import hookimpl
    from layerwise.objectives.base import Objective

    class Fake(Objective):
        name = "{name}"

        def loss(self, z, ctx):
            loss = z.pow(2).mean()
            return loss, {{"loss": loss.detach()}}

    @hookimpl
    def layerwise_register_objectives(registry):
        registry.register(Fake.name, Fake)
"""


def rows_by_name(cli) -> dict[str, dict]:
    result = cli("plugins", "--json")
    assert result.code == 0, result.err
    return {row["name"]: row for row in json.loads(result.out)}


def assert_no_traceback(result):
    assert "Traceback" not in result.out + result.err


# ---------------------------------------------------------------- discovery and its failures


def test_an_installed_plugin_is_discovered_with_its_distribution(install_fake, cli):
    install_fake("layerwise-fakeone", "fakeone", GOOD_PLUGIN.format(name="fakeone"))
    assert "fakeone" in plugins.registries().objectives
    row = rows_by_name(cli)["fakeone"]
    assert (row["distribution"], row["version"], row["status"]) == ("layerwise-fakeone", "1.2.3", "ok")
    assert row["objectives"] == ["fakeone"]
    table = cli("plugins")
    assert "fakeone" in table.out and "layerwise-fakeone" in table.out


def test_misspelled_hook_is_a_clear_error_naming_plugin_and_hook(fresh_plugins):
    typo = types.SimpleNamespace(layerwise_register_objetives=hookimpl(lambda registry: None))
    with pytest.raises(LayerwiseError) as info:
        with use_plugin(typo, name="typo-plugin"):
            pass
    message = str(info.value)
    assert "plugin 'typo-plugin'" in message
    assert "'layerwise_register_objetives'" in message
    assert "did you mean 'layerwise_register_objectives'?" in message
    pm = plugins.plugin_manager()
    assert pm.get_plugin("typo-plugin") is None
    pm.check_pending()  # the manager was left clean


@pytest.mark.parametrize("name, plugin, expected", [
    ("odd", types.SimpleNamespace(frobnicate=hookimpl(lambda registry: None)),
     r"plugin 'odd' implements 'frobnicate', which is not a layerwise hook; "
     r"hooks: layerwise_register_objectives, .*layerwise_register_commands"),
    ("wrong-args", types.SimpleNamespace(layerwise_register_objectives=hookimpl(lambda reg: None)),
     r"plugin 'wrong-args': .*\(reg\) asks for arguments that "
     r"layerwise_register_objectives does not pass; it passes: registry"),
    ("unmarked", types.SimpleNamespace(layerwise_register_objectives=lambda registry: None),
     r"plugin 'unmarked' implements no layerwise hook; decorate .*@hookimpl"),
], ids=["unguessable-hook-name-lists-the-real-hooks", "hook-with-arguments-its-spec-lacks",
        "no-hookimpl-markers"])
def test_a_malformed_plugin_is_a_clear_error(fresh_plugins, name, plugin, expected):
    with pytest.raises(LayerwiseError, match=expected):
        with use_plugin(plugin, name=name):
            pass


def test_installed_plugin_with_misspelled_hook_is_listed_and_other_commands_work(install_fake, cli):
    install_fake("layerwise-typo", "typo", """
        from layerwise import hookimpl

        @hookimpl
        def layerwise_register_objetives(registry):
            pass
    """)
    result = cli("plugins")
    assert result.code == 0 and "typo" in result.out
    assert_no_traceback(result)
    row = rows_by_name(cli)["typo"]
    assert row["status"] == "failed"
    assert "layerwise_register_objetives" in row["error"] and "layerwise_register_objectives" in row["error"]
    validated = cli("validate", "mnist_hybrid")
    assert validated.code == 0, validated.err


def test_a_plugin_that_fails_to_import_is_reported_by_name_and_does_not_break_other_commands(install_fake, cli):
    install_fake("layerwise-broken", "broken", "import a_module_that_is_not_installed\n")
    install_fake("layerwise-fine", "fine", GOOD_PLUGIN.format(name="fine"))
    rows = rows_by_name(cli)
    assert rows["broken"]["status"] == "failed"
    assert "ModuleNotFoundError" in rows["broken"]["error"]
    assert "a_module_that_is_not_installed" in rows["broken"]["error"]
    assert rows["broken"]["distribution"] == "layerwise-broken"
    assert rows["fine"]["status"] == "ok", "one broken plugin does not stop the others"
    table = cli("plugins")
    assert table.code == 0 and "broken" in table.out
    assert_no_traceback(table)
    assert cli("validate", "mnist_hybrid").code == 0
    # A recipe that needs something the broken plugin would have provided points at it.
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0]["objective"] = {"name": "brokenloss"}
    with pytest.raises(LayerwiseError, match=r"unknown objective 'brokenloss'.*failed to load: broken"):
        parse_recipe(data, "r.yaml")


def test_a_hook_that_raises_leaves_nothing_of_its_plugin_behind(install_fake, cli):
    install_fake("layerwise-halfway", "halfway", """
        from layerwise import hookimpl
        from layerwise.objectives.base import Objective

        class Half(Objective):
            name = "half"

        @hookimpl
        def layerwise_register_objectives(registry):
            registry.register("half", Half)

        @hookimpl
        def layerwise_register_layers(registry):
            raise RuntimeError("boom")
    """)
    regs = plugins.registries()
    assert "half" not in regs.objectives, "a plugin that failed halfway provides nothing"
    assert "nhsic" in regs.objectives
    assert plugins.FAILED["halfway"] == "layerwise_register_layers failed: RuntimeError: boom"


def test_a_plugin_that_takes_a_builtin_name_is_left_out(install_fake):
    install_fake("layerwise-thief", "thief", GOOD_PLUGIN.format(name="nhsic"))
    regs = plugins.registries()
    assert regs.objectives.owner("nhsic") == plugins.BUILTINS
    assert "registered twice: by layerwise.builtins and by thief" in plugins.FAILED["thief"]


@pytest.mark.parametrize("value", ["1", "all", "ALL"])
def test_disable_plugins_turns_off_every_third_party_plugin(install_fake, monkeypatch, cli, value):
    install_fake("layerwise-fakeone", "fakeone", GOOD_PLUGIN.format(name="fakeone"))
    install_fake("layerwise-broken", "broken", "raise ImportError('never imported')\n")
    monkeypatch.setenv("LAYERWISE_DISABLE_PLUGINS", value)
    plugins.reset()
    regs = plugins.registries()
    assert "fakeone" not in regs.objectives
    assert "nhsic" in regs.objectives, "built-ins are not plugins one can disable"
    assert not plugins.FAILED, "a disabled plugin is not even imported"
    rows = rows_by_name(cli)
    assert rows["fakeone"]["status"] == rows["broken"]["status"] == "disabled"
    assert "disabled by LAYERWISE_DISABLE_PLUGINS" in cli("plugins").out


@pytest.mark.parametrize("value", ["broken", "layerwise-broken", " layerwise_Broken , other"])
def test_disable_plugins_by_entry_point_or_distribution_name(install_fake, monkeypatch, value):
    install_fake("layerwise-fakeone", "fakeone", GOOD_PLUGIN.format(name="fakeone"))
    install_fake("layerwise-broken", "broken", "raise ImportError('never imported')\n")
    monkeypatch.setenv("LAYERWISE_DISABLE_PLUGINS", value)
    plugins.reset()
    assert "fakeone" in plugins.registries().objectives
    assert plugins.DISABLED == {"broken"}
    assert not plugins.FAILED


# ---------------------------------------------------------------- one test per hook


class Squares(Objective):
    """A toy local objective: the mean square of the block's output."""

    name = "squares"

    def loss(self, z, ctx):
        loss = z.pow(2).mean()
        return loss, {"loss": loss.detach()}


def test_hook_layerwise_register_objectives_adds_an_objective_recipes_can_use(fresh_plugins):
    plugin = types.SimpleNamespace(layerwise_register_objectives=hookimpl(
        lambda registry: registry.register(Squares.name, Squares)))
    with use_plugin(plugin, name="squares-plugin"):
        assert plugins.registries().objectives.owner("squares") == "squares-plugin"
        check_objective("squares", plugin="squares-plugin")
    assert "squares" not in plugins.registries().objectives, "use_plugin undoes itself"


def scale_layer(cfg, in_shape):
    """A toy layer: multiply by a learned scalar."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.factor * x

    return Scale()


def test_hook_layerwise_register_layers_adds_a_layer_with_inferred_shapes(fresh_plugins, cli):
    plugin = types.SimpleNamespace(layerwise_register_layers=hookimpl(
        lambda registry: registry.register("scale", scale_layer)))
    with use_plugin(plugin, name="scale-plugin"):
        data = tiny_recipe()
        data["model"]["subnetworks"][1]["blocks"].insert(0, {"name": "scaled", "layer": "scale"})
        graph = network_from_recipe(parse_recipe(data, "r.yaml"), (1, 28, 28), 10)
        assert graph.shapes["scaled"] == (16,)
        assert graph(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
        assert rows_by_name(cli)["scale-plugin"]["layers"] == ["scale"]


def test_hook_layerwise_register_streams_adds_a_stream_maker_recipes_name(fresh_plugins, cli):
    from layerwise.streams import StreamMaker

    class Twice(StreamMaker):
        name = "twice"
        names = ("double",)

        def make(self, x, y, network):
            return {"double": 2 * x}

    plugin = types.SimpleNamespace(layerwise_register_streams=hookimpl(
        lambda registry: registry.register(Twice.name, Twice)))
    with use_plugin(plugin, name="twice-plugin"):
        data = tiny_recipe()
        data["model"]["streams"] = {"name": "twice"}
        graph = network_from_recipe(parse_recipe(data, "r.yaml"), (1, 28, 28), 10)
        x = torch.randn(3, 1, 28, 28)
        out = graph.run(x, streams=graph.make_streams(x, torch.zeros(3, dtype=torch.int64)))
        torch.testing.assert_close(out.streams["double"]["hsic1"], graph.blocks["hsic1"](2 * x))
        assert rows_by_name(cli)["twice-plugin"]["streams"] == ["twice"]


def tiny_dataset_spec():
    from layerwise.data import DatasetSpec

    def load(split, search_dirs):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        count = 128 if split == "train" else 64
        labels = torch.arange(count) % 2
        images = torch.randint(0, 60, (count, 1, 6, 6), generator=g, dtype=torch.uint8)
        images[labels == 1, :, :3] += 180  # class 1 is bright on top: learnable in one epoch
        return images, labels

    return DatasetSpec(name="halves", shape=(1, 6, 6), num_classes=2, mean=(0.3,), std=(0.3,), loader=load)


def test_hook_layerwise_register_datasets_adds_a_dataset_that_trains_end_to_end(fresh_plugins, cli, tmp_path):
    plugin = types.SimpleNamespace(layerwise_register_datasets=hookimpl(
        lambda registry: registry.register("halves", tiny_dataset_spec())))
    with use_plugin(plugin, name="halves-plugin"):
        data = tiny_recipe(dataset="halves", batch_size=32)
        data["model"]["subnetworks"][1]["blocks"][0]["out"] = 2
        recipe = tmp_path / "halves.yaml"
        recipe.write_text(json.dumps(data))  # JSON is YAML
        result = cli("train", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--no-progress")
        assert result.code == 0, result.err
        run = (tmp_path / "runs" / "latest").resolve()
        record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["test_acc"] > 0.5


def test_hook_layerwise_register_commands_adds_a_cli_command(fresh_commands, cli):
    sub = typer.Typer(help="Toy commands.")

    @sub.command()
    def ping():
        """Answer pong."""
        typer.echo("pong")

    def register(app):
        @app.command()
        def hello(name: str = "world"):
            """Say hello."""
            if name == "nobody":
                raise LayerwiseError("hello: nobody is not a name")
            typer.echo(f"hello {name}")

        app.add_typer(sub, name="toy")

    plugin = types.SimpleNamespace(layerwise_register_commands=hookimpl(register))
    with use_plugin(plugin, name="hello-plugin"):
        result = cli("hello", "--name", "plugin")
        assert (result.code, result.out.strip()) == (0, "hello plugin")
        assert cli("toy", "ping").out.strip() == "pong"
        assert "hello" in cli("--help").out
        error = cli("hello", "--name", "nobody")
        assert error.code == 2 and "error: hello: nobody is not a name" in error.err
        assert_no_traceback(error)
        assert rows_by_name(cli)["hello-plugin"]["commands"] == ["hello", "toy"]


def test_plugin_commands_cannot_replace_builtin_ones(fresh_commands, cli):
    def register(app):
        @app.command()
        def train():
            """Not the real train."""
            typer.echo("hijacked")

    with use_plugin(types.SimpleNamespace(layerwise_register_commands=hookimpl(register)), name="hijack"):
        assert "Train the network" in cli("train", "--help").out
        row = rows_by_name(cli)["hijack"]
        assert row["status"] == "failed" and "train" in row["error"] and row["commands"] == []


def test_a_broken_commands_hook_does_not_break_the_cli(fresh_commands, cli):
    def register(app):
        raise ImportError("needs a package that is missing")

    with use_plugin(types.SimpleNamespace(layerwise_register_commands=hookimpl(register)), name="brokencmd"):
        result = cli("--help")
        assert result.code == 0 and "validate" in result.out
        assert_no_traceback(result)
        row = rows_by_name(cli)["brokencmd"]
        assert row["error"] == "layerwise_register_commands failed: ImportError: needs a package that is missing"


def test_builtin_commands_never_load_plugin_commands():
    from layerwise.cli import wants_plugin_commands

    assert not wants_plugin_commands(["validate", "mnist_hybrid"])
    assert not wants_plugin_commands(["recipes", "ls"])
    assert not wants_plugin_commands(["train", "--help"])
    # The root help lists every command, and an unknown word may be a plugin's command.
    assert wants_plugin_commands([]) and wants_plugin_commands(["--help"])
    assert wants_plugin_commands(["hello", "--name", "x"])


# ---------------------------------------------------------------- the shipped plugins

@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_shipped_plugins_use_only_the_public_api(plugin_dir):
    for path in plugin_dir.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] == "layerwise":
                    assert name in PUBLIC_MODULES, f"{path.relative_to(REPO)} imports {name}, not public API"


def shipped_objectives() -> dict[str, str]:
    """Entry-point name -> distribution, for the plugins under plugins/."""
    found = {}
    for plugin_dir in PLUGIN_DIRS:
        import tomllib

        project = tomllib.loads((plugin_dir / "pyproject.toml").read_text())["project"]
        for entry in project["entry-points"]["layerwise"]:
            found[entry] = project["name"]
    return found


@pytest.mark.parametrize("entry, dist", sorted(shipped_objectives().items()))
def test_shipped_plugins_are_installed_and_covered_by_the_routing_tests(entry, dist):
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{dist} is not installed: run make install (pip install -e plugins/{dist} --no-deps)")
    assert plugins.registries().objectives.owner(entry) == entry
    assert entry in local_objectives()


@pytest.mark.parametrize("recipe", ["mnist_localce", "mnist_simmatch"])
def test_plugin_recipes_use_their_plugins(recipe):
    from layerwise.factory import load_recipe
    from layerwise.shipped import shipped_recipes

    loaded = load_recipe(shipped_recipes()[recipe])
    used = {block.objective_name for block in loaded.model.blocks()}
    assert recipe.removeprefix("mnist_") in used
