"""``layerwise new-plugin NAME``: write a ready-to-install plugin package.

The package holds one module with one objective and its ``@hookimpl``, a pyproject that
declares the ``layerwise`` entry point, a test that runs :func:`layerwise.testing.check_objective`
and a README. ``pip install -e layerwise-NAME`` and its test passes as generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from layerwise.errors import LayerwiseError

NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


@dataclass(frozen=True)
class PluginNames:
    """The names one plugin goes by: ``hebbian`` -> layerwise-hebbian, layerwise_hebbian, Hebbian."""

    objective: str  # also the entry-point name, as `layerwise plugins` shows it
    distribution: str
    module: str
    cls: str

    @classmethod
    def from_name(cls, name: str) -> PluginNames:
        """Derive every name from what the user typed, or say what a valid name looks like."""
        short = re.sub(r"^layerwise[-_]", "", name.strip())
        if not NAME_PATTERN.fullmatch(short):
            raise LayerwiseError(
                f"plugin name '{name}': use lowercase letters, digits and single '-' or '_' between them, "
                f"starting with a letter, for example 'hebbian' or 'local-ce'"
            )
        objective = short.replace("-", "_")
        return cls(
            objective=objective,
            distribution=f"layerwise-{objective.replace('_', '-')}",
            module=f"layerwise_{objective}",
            cls="".join(part.capitalize() for part in objective.split("_")),
        )

    def substitutions(self) -> dict[str, str]:
        """Values for the ``$placeholders`` of the templates."""
        return {"name": self.objective, "dist": self.distribution, "module": self.module, "cls": self.cls}


def create_plugin(name: str, dest: Path) -> Path:
    """Write the package ``dest/layerwise-NAME/`` and return its folder; never overwrite."""
    names = PluginNames.from_name(name)
    from layerwise.plugins import registries

    objectives = registries().objectives
    if names.objective in objectives:
        raise LayerwiseError(f"an objective named '{names.objective}' exists already "
                             f"(from {objectives.owner(names.objective)}); choose another name")
    if dest.exists() and not dest.is_dir():
        raise LayerwiseError(f"--dir {dest}: not a folder")
    root = dest / names.distribution
    if root.exists():
        raise LayerwiseError(f"{root} already exists; choose another name or --dir")
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{names.module}.py": MODULE,
        f"tests/test_{names.objective}.py": TEST,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(names.substitutions()))
    return root


PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "The $name objective for layerwise (layer-wise learning on PyTorch)."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["layerwise>=0.1"]

[project.optional-dependencies]
test = ["pytest>=8"]

# This entry point is how layerwise finds the plugin: group "layerwise", name = plugin name,
# value = the module that holds the @hookimpl functions.
[project.entry-points.layerwise]
$name = "$module"

[tool.setuptools]
py-modules = ["$module"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

MODULE = '''\
"""$dist: the `$name` objective, a layerwise plugin.

A starting point: the cross-entropy of a linear read-out of the block's output, the
simplest local loss there is. Replace `loss()` with your own; layerwise's docs/plugins.md
describes what `ctx` holds and what to return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from layerwise import hookimpl
from layerwise.objectives.base import BlockInfo, LossContext, Objective


@dataclass
class ${cls}Config:
    """Options of `$name`, set in a recipe: `objective: {name: $name, weight: 1.0}`."""

    # Scales the loss. Typed and checked like every recipe key: `weight: big` is an error.
    weight: float = 1.0

    def __post_build__(self, path: str, problems) -> None:
        """Checks that types alone cannot express; each problem names its key path."""
        if self.weight <= 0:
            problems.add(f"{path}.weight", f"must be > 0, found {self.weight}")


class $cls(Objective):
    """`$name`: cross-entropy of a linear read-out of the block's output."""

    name = "$name"
    Config = ${cls}Config

    def __init__(self, config: ${cls}Config, info: BlockInfo):
        super().__init__(config, info)
        # A helper module: the block's optimizer trains it together with the block.
        self.readout = nn.Linear(math.prod(info.out_shape), info.num_classes)

    def loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The local loss of output `z` (batch first) and detached metrics to log per epoch."""
        logits = self.readout(z.flatten(1))
        loss = self.config.weight * nn.functional.cross_entropy(logits, ctx.y)
        accuracy = (logits.argmax(dim=1) == ctx.y).to(z.dtype).mean()
        return loss, {"loss": loss.detach(), "acc": accuracy.detach()}


@hookimpl
def layerwise_register_objectives(registry):
    """Make `$name` available to recipes."""
    registry.register($cls.name, $cls)
'''

TEST = '''\
"""`$name` keeps the layerwise objective contract: registered by this plugin, routed, and it learns."""

from layerwise.testing import check_objective


def test_${name}_keeps_the_objective_contract():
    metrics = check_objective("$name", {"weight": 1.0}, plugin="$name")
    assert set(metrics) == {"loss", "acc"}
'''

README = '''\
# $dist

The `$name` objective for layerwise (layer-wise learning on PyTorch): a local loss
that trains one block of a network by itself.

## Install and test

```bash
pip install -e .            # into the environment that has layerwise
pytest                      # runs layerwise.testing.check_objective on `$name`
layerwise plugins           # lists $name with what it provides
```

## Use it in a recipe

```yaml
- {name: local1, layer: linear, out: 256, act: relu, objective: {name: $name, weight: 1.0}}
```

## Develop

The objective lives in `$module.py`. layerwise's `docs/plugins.md` explains the contract:
what `loss(z, ctx)` receives, how helper modules are trained, and how to return metrics.
'''
