"""Shared fixtures: a private data cache, the real-data location, and an in-process CLI runner."""

from __future__ import annotations

import os

import pytest

from tests.helpers import SHARED_DATA, CliResult, call_main, real_mnist_present


def pytest_configure(config):
    """Under pytest-xdist (``make test``), one torch thread per worker process.

    torch starts as many threads as the machine has cores, in every worker, so two workers on a
    2-core machine would run four threads on two cores and slow each other down. Set before any
    test runs, in each worker only (the xdist controller runs no tests; a plain ``pytest`` keeps
    torch's default). ``OMP_NUM_THREADS`` is for the subprocesses the tests start, which inherit
    it; ``torch.set_num_threads`` for this process, since torch reads the variable only when it is
    first imported (here, or earlier by some pytest plugin: importing it now is what a test module
    would do next anyway).
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


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
