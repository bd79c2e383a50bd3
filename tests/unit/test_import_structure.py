"""The direction of imports (docs/DESIGN.md, "Layout and the direction of imports"):
benchmarks -> compression -> service and benchmarks -> service; never service -> compression, never
anything -> benchmarks; and no import cycle among the project's modules.

The graph comes from the source (every `import` and `from ... import` in every .py file, at module
level or inside a function: a lazy import is still a dependency), so it covers code paths no test
happens to run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("service", "compression", "benchmarks")
FORBIDDEN = {("service", "compression"), ("service", "benchmarks"), ("compression", "benchmarks")}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, tree: ast.AST) -> set[str]:
    """Dotted names a file imports (for `from a import b`: both a and a.b, b may be a module)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, up level - 1
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (the longest known prefix of each imported name)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in _imported(module, path, ast.parse(path.read_text(), str(path))):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_serving_app_loads_neither_torch_nor_compression():
    code = (
        "import sys, service.app\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'compression')))\n"
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_imports_run_one_way():
    graph = import_graph()
    assert len(graph) > 50 and "compression.modeling" in graph["compression.trimmed"]  # the graph is read, not empty
    wrong = sorted(
        f"{a} -> {b}" for a, edges in graph.items() for b in edges if (a.partition(".")[0], b.partition(".")[0]) in FORBIDDEN
    )
    assert not wrong, "imports against benchmarks -> compression -> service:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
