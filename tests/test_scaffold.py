"""``layerwise new-plugin``: the package it writes is complete, installable, and passes its own test."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tomllib

import pytest

from layerwise import plugins
from layerwise.scaffold import PluginNames
from layerwise.testing import check_objective, use_plugin
from tests.helpers import assert_one_line_error


def test_new_plugin_writes_a_package_with_entry_point_module_test_and_readme(cli, tmp_path):
    result = cli("new-plugin", "local-ce", "--dir", str(tmp_path))
    assert result.code == 0, result.err
    root = tmp_path / "layerwise-local-ce"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "README.md", "layerwise_local_ce.py", "pyproject.toml", "tests/test_local_ce.py",
    ]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == "layerwise-local-ce"
    assert project["entry-points"]["layerwise"] == {"local_ce": "layerwise_local_ce"}
    module = (root / "layerwise_local_ce.py").read_text()
    assert "from layerwise import hookimpl" in module and 'name = "local_ce"' in module
    assert "pip install -e" in result.out


def test_the_generated_objective_keeps_the_contract_before_installation(cli, tmp_path):
    assert cli("new-plugin", "scaffolded", "--dir", str(tmp_path)).code == 0
    path = tmp_path / "layerwise-scaffolded" / "layerwise_scaffolded.py"
    spec = importlib.util.spec_from_file_location("layerwise_scaffolded", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        plugins.reset()
        with use_plugin(module, name="scaffolded"):
            assert set(check_objective("scaffolded", {"weight": 0.5}, plugin="scaffolded")) == {"loss", "acc"}
            check_objective("scaffolded", layer="conv2d")
    finally:
        sys.modules.pop(spec.name, None)
        plugins.reset()


@pytest.mark.parametrize(
    "typed, objective, distribution, module, cls",
    [
        ("hebbian", "hebbian", "layerwise-hebbian", "layerwise_hebbian", "Hebbian"),
        ("layerwise-local-ce", "local_ce", "layerwise-local-ce", "layerwise_local_ce", "LocalCe"),
        ("sim_2", "sim_2", "layerwise-sim-2", "layerwise_sim_2", "Sim2"),
    ],
)
def test_plugin_names_follow_from_the_name_typed(typed, objective, distribution, module, cls):
    assert PluginNames.from_name(typed) == PluginNames(objective, distribution, module, cls)


@pytest.mark.parametrize("name", ["Hebbian", "2fast", "my loss", "a--b", "x-"])
def test_bad_names_are_one_line_errors(cli, tmp_path, name):
    result = cli("new-plugin", name, "--dir", str(tmp_path))
    assert_one_line_error(result, f"plugin name '{name}'", "for example 'hebbian'")
    assert not list(tmp_path.iterdir())


def test_taken_names_and_existing_folders_are_refused(cli, tmp_path):
    assert_one_line_error(cli("new-plugin", "nhsic", "--dir", str(tmp_path)),
                          "an objective named 'nhsic' exists already (from layerwise.builtins)")
    assert cli("new-plugin", "twice", "--dir", str(tmp_path)).code == 0
    readme = tmp_path / "layerwise-twice" / "README.md"
    readme.write_text("edited")
    assert_one_line_error(cli("new-plugin", "twice", "--dir", str(tmp_path)), "already exists")
    assert readme.read_text() == "edited", "never overwrite"
    (tmp_path / "file").write_text("")
    assert_one_line_error(cli("new-plugin", "other", "--dir", str(tmp_path / "file")), "not a folder")


@pytest.mark.integration
def test_the_generated_package_passes_its_own_test_after_pip_install(cli, tmp_path):
    # Installed into a private folder put on PYTHONPATH (as tests/test_install.py installs layerwise),
    # never into the shared venv: under pytest-xdist another worker may be discovering plugins or
    # starting Pythons in that venv meanwhile, and would see a half-installed distribution (a plugin
    # that fails to load, a traceback from a half-written .pth). Not editable for that reason: an
    # editable install works through a .pth file, which Python reads only in site-packages folders,
    # not in PYTHONPATH ones. The entry point is found all the same, from the dist-info in ``site``.
    name = "scaffoldcheck"
    assert cli("new-plugin", name, "--dir", str(tmp_path)).code == 0
    root, site = tmp_path / f"layerwise-{name}", tmp_path / "site"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--no-compile", "--target", str(site), str(root)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    assert any(site.glob(f"layerwise_{name}-*.dist-info")), sorted(p.name for p in site.iterdir())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root,
                            capture_output=True, text=True, env=env, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "1 passed" in tested.stdout  # its test asserts that the entry point registered the objective
    with pytest.raises(importlib.metadata.PackageNotFoundError):  # the shared venv was never changed
        importlib.metadata.distribution(f"layerwise-{name}")
