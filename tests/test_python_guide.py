"""The Python API guide, docs/python.md: its worked example runs as written, and every ``lw.<name>``
it mentions exists."""

from __future__ import annotations

import re

import pytest

import layerwise
from tests.helpers import REPO

GUIDE = REPO / "docs" / "python.md"


def guide_text() -> str:
    return GUIDE.read_text()


def worked_example() -> str:
    """The guide's one runnable block: fenced as plain ```python (the others say ```python notest)."""
    blocks = re.findall(r"^```python\n(.*?)^```", guide_text(), flags=re.M | re.S)
    assert len(blocks) == 1, f"docs/python.md must have exactly one ```python block, found {len(blocks)}"
    return blocks[0]


def test_every_api_name_in_the_guide_exists():
    used = set(re.findall(r"\blw\.([A-Za-z_]\w*)", guide_text()))
    assert {"Network", "Block", "Trainer", "batches", "evaluate", "split", "load_model"} <= used
    missing = sorted(used - set(layerwise.__all__))
    assert not missing, f"docs/python.md uses names that layerwise.__all__ lacks: {missing}"


def test_the_guide_has_one_worked_example_and_points_to_the_plugin_guide():
    example = worked_example()
    assert "import layerwise as lw" in example and "assert accuracy[0.0]" in example
    assert "plugins.md" in guide_text() and "design.md" in guide_text()


@pytest.mark.integration
def test_the_worked_example_runs_as_written(mnist_available, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an empty folder: the example finds MNIST and writes its file there
    namespace = {"__name__": "__main__"}
    exec(compile(worked_example(), "docs/python.md", "exec"), namespace)
    accuracy = namespace["accuracy"]
    assert set(accuracy) == {0.0, 0.5}
    assert 0.6 < accuracy[0.0] <= 1.0 and 0.0 <= accuracy[0.5] <= accuracy[0.0]
    assert namespace["summary"]["blocks"]["hsic1"].keys() >= {"loss", "hsic_zx", "hsic_zy"}
    assert (tmp_path / "hybrid.safetensors").is_file()
    assert str(accuracy) in capsys.readouterr().out
