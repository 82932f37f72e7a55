"""The consoles' width: ``$COLUMNS`` as it is at each print, unless a width was given."""

from __future__ import annotations

import io

from layerwise import progress


def test_the_width_follows_columns_set_after_the_console_was_made(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    console = progress.PipeFriendlyConsole(file=io.StringIO())  # as at import, under a runner that set 80
    monkeypatch.setenv("COLUMNS", "200")
    assert console.width == 200
    assert progress.PipeFriendlyConsole(file=io.StringIO(), width=100).width == 100, "a given width wins"
