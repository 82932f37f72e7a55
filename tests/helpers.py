"""Helpers shared by the test modules (import them as ``from tests.helpers import ...``).

Fixtures live in ``conftest.py``; plain functions and constants live here, because pytest
does not mean conftest files to be imported.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


class CliResult:
    """Exit code and captured output of one in-process ``layerwise`` call."""

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

def tiny_recipe(**data_overrides) -> dict:
    """A small hybrid MLP recipe as plain data, for fast tests."""
    data = {"dataset": "mnist", "batch_size": 64, **data_overrides}
    return {
        "name": "tiny",
        "seed": 0,
        "data": data,
        "model": {
            "subnetworks": [
                {"name": "sn1", "blocks": [
                    {"name": "hsic1", "layer": "linear", "out": 32, "act": "relu",
                     "objective": {"name": "nhsic", "sigma": 5, "beta": 100}},
                    {"name": "bp1", "layer": "linear", "out": 16, "act": "relu"},
                ]},
                {"name": "sn2", "blocks": [{"name": "head", "layer": "linear", "out": 10}]},
            ]
        },
        "train": {"epochs": 1, "device": "cpu"},
    }
