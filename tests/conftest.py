"""Shared fixtures: a private data cache, the real-data location, and an in-process CLI runner."""

from __future__ import annotations

import pytest

from tests.helpers import SHARED_DATA, CliResult, call_main, real_mnist_present


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path_factory, monkeypatch):
    """Decoded-dataset caches go to a per-session folder, never the user's home."""
    monkeypatch.setenv("LAYERWISE_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))


@pytest.fixture
def mnist_available():
    """Skip unless real MNIST is beside the repository (as in CI: ../shared/data)."""
    if not real_mnist_present():
        pytest.skip(f"real MNIST not found under {SHARED_DATA}")


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``layerwise ARGS...`` in-process through the real entry point (error handling included)."""

    def run(*args: str) -> CliResult:
        monkeypatch.setenv("COLUMNS", "200")  # wide enough that rich does not wrap messages
        code = call_main(*args)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
