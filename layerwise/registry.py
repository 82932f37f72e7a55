"""Name-to-component registries that plugins fill through hooks.

One small class serves objectives, layers and datasets alike: each component is stored
under a static name, a duplicate name is an error naming both owners, and an unknown name
gets a did-you-mean.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from layerwise.errors import LayerwiseError

T = TypeVar("T")


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """Components of one kind (objectives, layers, datasets), keyed by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self._current_owner = "layerwise"
        # Appended to unknown-name errors; the plugin loader points here at plugins that
        # failed to load or were disabled, since a missing name is often the symptom of one.
        self.note: Callable[[], str] = lambda: ""

    def register(self, name: str, item: T, *, aliases: tuple[str, ...] = ()) -> None:
        """Store ``item`` under ``name`` (and its aliases); a taken name is an error."""
        for key in (name, *aliases):
            if key in self._items:
                raise LayerwiseError(
                    f"{self.kind} '{key}' is registered twice: by {self._owners[key]} "
                    f"and by {self._current_owner}"
                )
            self._items[key] = item
            self._owners[key] = self._current_owner

    def get(self, name: str) -> T:
        """Return the component called ``name`` or raise with the known names."""
        if name not in self._items:
            raise LayerwiseError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        """Say that ``name`` is unknown, with a suggestion and the known names."""
        return (
            f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
            f"known: {', '.join(self.names())}{self.note()}"
        )

    def owner(self, name: str) -> str:
        """The plugin that registered ``name``."""
        return self._owners[name]

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def set_owner(self, owner: str) -> None:
        """Attribute the next registrations to plugin ``owner`` (used while hooks run)."""
        self._current_owner = owner

    def remove_owner(self, owner: str) -> None:
        """Forget everything plugin ``owner`` registered, so that a plugin that failed halfway provides nothing."""
        for name in [n for n, o in self._owners.items() if o == owner]:
            del self._items[name]
            del self._owners[name]
