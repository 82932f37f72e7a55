"""Turn plain YAML data into typed dataclasses, collecting every problem at once.

Recipes and objective configs are dataclasses. :func:`build` walks a dataclass's type hints
and checks a mapping against them, recording each problem with its key path (for example
``model.subnetworks[0].blocks[1].out``) instead of stopping at the first one, so a user
fixes a recipe in one pass.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any, Literal, Union

from layerwise.registry import did_you_mean

MISSING = dataclasses.MISSING


class Problems:
    """An accumulator of 'path: message' strings.

    ``context`` is what checks may consult beyond the value itself: for recipes, the
    registries of objectives, layers and datasets, passed in by the caller rather than looked
    up from inside a check (so validation depends on no global state and imports no plugin).
    """

    def __init__(self, context: Any = None) -> None:
        self.items: list[str] = []
        self.context = context

    def add(self, path: str, message: str) -> None:
        """Record one problem at ``path``."""
        self.items.append(f"{path}: {message}" if path else message)

    def __bool__(self) -> bool:
        return bool(self.items)


def short_repr() -> reprlib.Repr:
    """A bounded repr: a found value may be huge, deeply nested or self-referencing (YAML aliases)."""
    bounded = reprlib.Repr()  # keyword arguments need Python 3.12
    bounded.maxlevel, bounded.maxlist, bounded.maxdict = 2, 4, 4
    bounded.maxstring = bounded.maxlong = bounded.maxother = 30
    return bounded


SHORT_REPR = short_repr()


def describe(value: Any) -> str:
    """A short description of a found value, for error messages."""
    try:
        text = SHORT_REPR.repr(value)
    except ValueError:  # an int too long for str() (Python's int_max_str_digits)
        text = "..."
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def join(path: str, key: str | int) -> str:
    """Extend a key path by a mapping key or a list index."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def build(cls: type, data: Any, path: str, problems: Problems) -> Any:
    """Build dataclass ``cls`` from mapping ``data``; on problems return None and record them.

    A field's ``check`` metadata, ``check(value, path, problems)``, validates its value as soon
    as the type is right, so range and name errors are reported beside type errors elsewhere.
    A dataclass may define ``__post_build__(self, path, problems)`` for checks that span fields.
    """
    if not isinstance(data, dict):
        problems.add(path, f"expected a mapping, found {describe(data)}")
        return None
    hints = typing.get_type_hints(cls)
    # A field may be spelled differently in YAML (``global`` is a Python keyword).
    fields = {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            problems.add(join(path, str(key)), f"unknown key{did_you_mean(str(key), list(fields))}; "
                                               f"allowed: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    ok = True
    for name, field in fields.items():
        sub = join(path, name)
        if name in data:
            before = len(problems.items)
            kwargs[field.name] = convert(hints[field.name], data[name], sub, problems)
            check = field.metadata.get("check")
            if check is not None and len(problems.items) == before and kwargs[field.name] is not None:
                check(kwargs[field.name], sub, problems)
            ok = ok and len(problems.items) == before
        elif field.default is MISSING and field.default_factory is MISSING:
            problems.add(sub, "required key is missing")
            ok = False
    if not ok or any(k not in fields for k in data):
        return None
    obj = cls(**kwargs)
    post = getattr(obj, "__post_build__", None)
    if post is not None:
        before = len(problems.items)
        post(path, problems)
        if len(problems.items) != before:
            return None
    return obj


def convert(hint: Any, value: Any, path: str, problems: Problems) -> Any:
    """Check ``value`` against type ``hint`` and convert it (ints to floats, lists to dataclasses)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            trial = Problems(problems.context)
            result = convert(option, value, path, trial)
            if not trial:
                return result
        if len(options) == 1:
            return convert(options[0], value, path, problems)
        problems.add(path, f"expected {type_name(hint)}, found {describe(value)}")
        return None
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            hint_text = did_you_mean(str(value), [str(a) for a in args])
            problems.add(path, f"expected one of {choices}, found {describe(value)}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.add(path, f"expected a list, found {describe(value)}")
            return None
        return [convert(args[0], item, join(path, i), problems) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.add(path, f"expected a mapping, found {describe(value)}")
            return None
        return {k: convert(args[1], v, join(path, str(k)), problems) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, problems)
    if hint is bool:
        if not isinstance(value, bool):
            problems.add(path, f"expected true or false, found {describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(path, f"expected an integer, found {describe(value)}")
        elif not -(2**63) <= value < 2**63:
            # PyTorch takes sizes and seeds as 64-bit integers; larger ones overflow inside it.
            problems.add(path, f"expected an integer that fits in 64 bits, found {describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML reads 1e-4 (no dot) as a string; accept any finite number written that way.
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.add(path, f"expected a number, found {describe(value)}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.add(path, f"expected a string, found {describe(value)}")
        return value
    raise TypeError(f"schema cannot check type {hint!r} at {path}")  # a bug in a config class


def type_name(hint: Any) -> str:
    """A readable name for a type hint."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is list:
        return f"a list of {type_name(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def positive(value: float, path: str, problems: Problems) -> None:
    """A ``check`` for fields that must be > 0."""
    if value <= 0:
        problems.add(path, f"expected a value > 0, found {value}")


def non_negative(value: float, path: str, problems: Problems) -> None:
    """A ``check`` for fields that must be >= 0."""
    if value < 0:
        problems.add(path, f"expected a value >= 0, found {value}")


def check(fn, default: Any = MISSING, **kwargs: Any) -> Any:
    """A dataclass field whose value ``fn(value, path, problems)`` validates."""
    if default is not MISSING:
        kwargs["default"] = default
    return dataclasses.field(metadata={"check": fn}, **kwargs)


def yaml_key(field: dataclasses.Field) -> str:
    """The key that spells ``field`` in YAML: its ``key`` metadata, else its name."""
    return field.metadata.get("key", field.name)


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts and lists, for YAML and JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # Fields outside __init__ are derived (e.g. a block's built objective config), not YAML.
        return {yaml_key(f): to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
