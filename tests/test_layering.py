"""The package's layering: no import cycle (imports inside functions included), recipe
validation without torch, and a package root that imports torch only when the API is used."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import REPO

PACKAGE = REPO / "layerwise"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the layerwise modules it imports anywhere in its code (functions included;
    ``if TYPE_CHECKING`` blocks excluded, since they never run)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # 'from layerwise import x' imports the submodule x when there is one, else the root
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 30 and "layerwise.api" in graph["layerwise"]  # the lazy root is counted too
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout


def test_hookimpl_and_recipe_validation_import_no_torch():
    out = run_python(
        "import sys\n"
        "from layerwise import hookimpl\n"
        "import layerwise.recipe, layerwise.schema, layerwise.shipped, layerwise.topology\n"
        "print('torch' in sys.modules)\n"
    )
    assert out.strip() == "False"


def test_the_api_is_imported_on_first_use():
    out = run_python(
        "import sys, layerwise as lw\n"
        "before = 'layerwise.api' in sys.modules\n"
        "lw.Network\n"
        "print(before, 'layerwise.api' in sys.modules, sorted(set(lw.__all__) - set(dir(lw))))\n"
    )
    assert out.strip() == "False True []"
