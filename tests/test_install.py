"""``pip install .`` works: a non-editable install, used from a folder outside the repository.

The project is copied, built and installed into a temporary ``site`` folder, which is put on
PYTHONPATH; ``layerwise`` is the installed console script and runs in a temporary working folder,
so the shipped recipes must come from the installed package data, not from the checkout.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, SHARED_DATA, real_mnist_present

pytestmark = pytest.mark.integration

# What the checkout holds besides the project's source: never part of a build. Among them what
# other processes create and delete while the copy is made (under pytest-xdist, other workers;
# also benchmarks writing docs/results): hypothesis' database, atomic writes' temporaries
# (.NAME.tmp), lock files and run folders. A file that vanishes mid-copy makes copytree fail.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", ".hypothesis", "*.tmp", "*.lock")


def copy_unless_gone(src: str, dst: str) -> None:
    """Copy one file for copytree, skipping it if it was deleted since copytree listed its folder:
    the patterns above cannot name every short-lived file another process may make."""
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:
        if os.path.lexists(src):  # it is there: the error is about something else
            raise


def build_isolation_flags() -> list[str]:
    """Build with this environment's setuptools when it is recent enough (offline), else let pip fetch one."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= 77 else []


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The project installed non-editable under a temporary folder: where it went, and how to run it."""
    root = tmp_path_factory.mktemp("install")
    source, site = root / "source", root / "site"
    # A copy, so that the build writes its build/ and egg-info there and not into the checkout.
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True, copy_function=copy_unless_gone)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                           *build_isolation_flags(), "--target", str(site), str(source)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # Real MNIST as ../shared/data, seen from the working folder and from the installed package alike.
    if real_mnist_present():
        (root / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    work = root / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "LAYERWISE_DATA": str(root / "cache"), "COLUMNS": "200",
           "OMP_NUM_THREADS": "1"}
    return {"site": site, "work": work, "env": env, "script": site / "bin" / "layerwise"}


def layerwise(installed: dict, *args: str) -> subprocess.CompletedProcess:
    """The installed ``layerwise`` console script, run in the temporary working folder."""
    return subprocess.run([str(installed["script"]), *args], cwd=installed["work"], env=installed["env"],
                          capture_output=True, text=True, timeout=120)


def test_the_installed_package_is_the_one_that_runs(installed):
    assert installed["script"].is_file(), "the console script of [project.scripts] was not installed"
    found = subprocess.run([sys.executable, "-c", "import layerwise; print(layerwise.__file__)"],
                           cwd=installed["work"], env=installed["env"], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve().is_relative_to(installed["site"].resolve()), found.stdout


def test_recipes_ls_lists_the_shipped_recipes(installed):
    done = layerwise(installed, "recipes", "ls")
    assert done.returncode == 0, done.stderr
    assert "mnist_hybrid" in done.stdout


def test_recipes_cp_copies_the_shipped_recipe(installed):
    done = layerwise(installed, "recipes", "cp", "mnist_hybrid", "my.yaml")
    assert done.returncode == 0, done.stderr
    copied = installed["work"] / "my.yaml"
    assert copied.read_text() == (installed["site"] / "layerwise" / "recipes" / "mnist_hybrid.yaml").read_text()
    assert copied.read_text() == (REPO / "layerwise" / "recipes" / "mnist_hybrid.yaml").read_text()


@pytest.mark.skipif(not real_mnist_present(), reason=f"real MNIST not under {SHARED_DATA}")
def test_train_a_shipped_recipe_by_name(installed):
    done = layerwise(installed, "train", "mnist_hybrid", "train.epochs=1", "data.train_limit=2048", "--no-progress")
    assert done.returncode == 0, done.stderr
    runs = installed["work"] / "runs"
    folders = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(folders) == 1, folders
    assert (folders[0] / "model.safetensors").is_file()
