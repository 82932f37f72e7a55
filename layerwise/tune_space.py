"""What ``layerwise tune`` searches over: the ``--param KEY=SPACE`` syntax, seeds and the metric.

Parsed and checked here, without Optuna (a :class:`Space` asks an Optuna trial for its value
only when the search runs), so every mistake is a one-line error before anything starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from layerwise.errors import LayerwiseError

METRICS = {"val_acc": "val acc", "best_val_acc": "best val acc"}
"""What a trial can be judged on: the last epoch's validation accuracy, or the best epoch's."""

SPACE_SYNTAX = (
    "log:1e-4..1e-2 (a float, log scale), float:0.1..0.9 or 0.1..0.9 (a float), int:16..256 or "
    "int:16..256:log (an integer), choice:relu,tanh,gelu (values read as YAML scalars), grid:1,5,10 "
    "(every combination of the grid parameters; all --param must then be grids)"
)

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")



@dataclass(frozen=True)
class Space:
    """The values one recipe key may take: a float or int range, choices, or grid values."""

    key: str
    kind: str  # "float", "int", "choice" or "grid"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    values: tuple = ()
    text: str = ""  # as written after KEY=

    def suggest(self, trial) -> Any:
        """Ask the trial for this key's value."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.key, list(self.values))

    def candidates(self) -> list:
        """Values that check the key against the recipe before anything runs: a range's ends, every choice."""
        return [self.low, self.high] if self.kind in ("float", "int") else list(self.values)


def parse_param(text: str) -> Space:
    """``KEY=SPACE`` (see :data:`SPACE_SYNTAX`) as a :class:`Space`; a mistake is a one-line error."""
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or not spec:
        raise LayerwiseError(f"--param {text!r}: expected KEY=SPACE, e.g. optim.local.lr=log:1e-4..1e-2; "
                             f"SPACE is one of {SPACE_SYNTAX}")
    if not all(key.split(".")):
        raise LayerwiseError(f"--param {text!r}: the key has an empty part")
    return parse_space(key, spec)


def parse_space(key: str, spec: str) -> Space:
    """One key's SPACE text as a :class:`Space`."""
    where = f"--param {key}={spec}"
    kind, sep, body = spec.partition(":")
    kind = kind.strip().lower()
    if not sep:
        kind, body = "float", spec  # a bare LOW..HIGH is a float range
    elif kind not in ("log", "float", "int", "choice", "grid"):
        raise LayerwiseError(f"{where}: unknown kind '{kind}'; expected one of {SPACE_SYNTAX}")
    if kind in ("choice", "grid"):
        return Space(key, kind, values=parse_values(body, where), text=spec)
    bounds, sep, scale = body.partition(":")
    log = kind == "log"
    if sep:
        if scale.strip() != "log" or kind == "log":
            raise LayerwiseError(f"{where}: expected '{kind}:LOW..HIGH' or '{kind}:LOW..HIGH:log', found ':{scale}'")
        log = True
    low, high = parse_range(bounds, int if kind == "int" else float, where)
    if log and low <= 0:
        raise LayerwiseError(f"{where}: a log scale needs LOW > 0, found {low}")
    return Space(key, "int" if kind == "int" else "float", low, high, log, text=spec)


def parse_range(text: str, number: type, where: str) -> tuple[Any, Any]:
    """``LOW..HIGH`` as two finite numbers of type ``number`` with LOW < HIGH."""
    low_text, sep, high_text = text.partition("..")
    if not sep:
        raise LayerwiseError(f"{where}: expected a range LOW..HIGH, e.g. 1e-4..1e-2, found {text!r}")
    bounds = []
    for part in (low_text.strip(), high_text.strip()):
        try:
            value = number(part)
        except ValueError:
            value = None
        if value is None or (number is float and not math.isfinite(value)):
            what = "an integer" if number is int else "a finite number"
            raise LayerwiseError(f"{where}: expected {what} on each side of '..', found {part!r}")
        bounds.append(value)
    if bounds[0] >= bounds[1]:
        raise LayerwiseError(f"{where}: expected LOW < HIGH, found {bounds[0]}..{bounds[1]}")
    return bounds[0], bounds[1]


def parse_values(text: str, where: str) -> tuple:
    """Comma-separated YAML scalars (``relu``, ``10``, ``1e-3``, ``true``), each distinct."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise LayerwiseError(f"{where}: expected comma-separated values, found an empty one")
        try:
            value = yaml.safe_load(item)
        except yaml.YAMLError:
            value = item
        if isinstance(value, str) and NUMBER.fullmatch(value):
            value = float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, float) and not math.isfinite(value):
            raise LayerwiseError(f"{where}: expected finite numbers, found {item!r}")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise LayerwiseError(f"{where}: expected plain values (numbers, words, true/false), found {item!r}")
        if any(type(value) is type(seen) and value == seen for seen in values):
            raise LayerwiseError(f"{where}: the value {item!r} is given twice")
        values.append(value)
    return tuple(values)


def parse_params(params: Sequence[str] | Mapping[str, str]) -> list[Space]:
    """Every ``--param``, checked together: at least one, no key twice, grids not mixed with others."""
    items = [f"{k}={v}" for k, v in params.items()] if isinstance(params, Mapping) else list(params)
    if not items:
        raise LayerwiseError(f"give at least one --param KEY=SPACE, where SPACE is one of {SPACE_SYNTAX}")
    spaces = [parse_param(item) for item in items]
    keys = [space.key for space in spaces]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise LayerwiseError(f"--param: {', '.join(twice)} is given twice; give each key one space")
    grids = [space.key for space in spaces if space.kind == "grid"]
    if grids and len(grids) < len(spaces):
        others = [space.key for space in spaces if space.kind != "grid"]
        raise LayerwiseError(f"--param: grid values ({', '.join(grids)}) cannot be mixed with ranges or choices "
                             f"({', '.join(others)}): a grid search tries every combination of the grids; make "
                             f"every --param a grid, or none")
    return spaces


def parse_seeds(text: str | Sequence[int] | None) -> list[int] | None:
    """``0,1,2`` as distinct non-negative seeds (None: the recipe's own seed, once)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")] if isinstance(text, str) else list(text)
    seeds = []
    for item in items:
        try:
            seed = int(item)
        except (TypeError, ValueError):
            seed = -1
        if not 0 <= seed < 2**63 or seed in seeds:
            raise LayerwiseError(f"--seeds {text}: expected distinct seeds >= 0 separated by commas, e.g. 0,1,2")
        seeds.append(seed)
    return seeds


def check_metric(metric: str) -> str:
    """The objective must be validation accuracy: choosing on the test set would leak it into the choice."""
    if "test" in metric:
        raise LayerwiseError(f"--metric {metric}: tune never chooses on the test set (the test accuracy of a "
                             f"configuration chosen on it is biased upwards); use val_acc or best_val_acc, which "
                             f"the data.validation samples held out of training give")
    if metric not in METRICS:
        raise LayerwiseError(f"--metric {metric}: expected val_acc (the last epoch's) or best_val_acc (the best "
                             f"epoch's validation accuracy)")
    return metric


def yaml_scalar(value: Any) -> str:
    """``value`` written so that an override (``KEY=TEXT``, read as YAML) reads it back unchanged."""
    if isinstance(value, float):
        text = repr(value)  # 1e-05: YAML reads a float only with a dot, 1.0e-05
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def shown(value: Any) -> str:
    """A sampled value for people: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def short_labels(keys: Sequence[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key ends with: sigma, hsic1.objective.sigma."""
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(other != key and (other == label or other.endswith("." + label)) for other in keys):
                break
        labels[key] = label
    return labels
