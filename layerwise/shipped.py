"""The recipes shipped inside the package (``layerwise/recipes/``, package data): list, find and copy them.

They travel in the wheel, so shipped names work after a plain ``pip install``; a clone also
reaches them as ``recipes/`` (a link to this folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from layerwise.errors import LayerwiseError
from layerwise.registry import did_you_mean

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> path, for every shipped recipe."""
    if not RECIPES_DIR.is_dir():
        return {}
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def describe(path: Path) -> str:
    """The first line of the recipe's opening comment: what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def resolve_recipe_path(text: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (``mnist_hybrid``)."""
    path = Path(text)
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in text:
        return path
    recipes = shipped_recipes()
    if text in recipes:
        return recipes[text]
    raise LayerwiseError(f"{text}: neither a recipe file nor a shipped recipe{did_you_mean(text, list(recipes))}; "
                         f"see 'layerwise recipes ls'")


def copy_recipe(name: str, dest: Path) -> Path:
    """Copy shipped recipe ``name`` to ``dest`` (a file, or a folder to put it in); never overwrite."""
    recipes = shipped_recipes()
    if name.removesuffix(".yaml") not in recipes:
        raise LayerwiseError(f"no shipped recipe '{name}'{did_you_mean(name, list(recipes))}; "
                             f"known: {', '.join(recipes)}")
    source = recipes[name.removesuffix(".yaml")]
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise LayerwiseError(f"{target} already exists; choose another destination")
    if not target.parent.is_dir():
        raise LayerwiseError(f"{target.parent} is not a folder")
    shutil.copyfile(source, target)
    return target
