"""No import circle between the project's modules.

Every `import` / `from ... import` of a project module counts, at module level or inside a function (an import
hidden in a function only defers the circle to the first call, it does not remove it), and so does
`importlib.import_module("literal.name")`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit
PACKAGES = ("training", "data_pipeline", "launch", "evals")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def add(mod: str) -> None:
        # `import a.b.c` loads a.b.c: count the deepest project module the dotted name reaches.
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            found.add(mod)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:  # `from pkg import module` imports the submodule itself
                sub = f"{mod}.{alias.name}"
                add(sub if sub in known else mod)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                add(node.args[0].value)  # importlib.import_module("pkg.mod") with a literal name
    return found


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
    return f"circle of {len(comp)}: " + "; ".join(edges)


def test_the_graph_sees_local_relative_and_submodule_imports(tmp_path):
    known = {"pkg": tmp_path / "pkg/__init__.py", "pkg.a": tmp_path / "pkg/a.py", "pkg.b": tmp_path / "pkg/b.py",
             "pkg.c": tmp_path / "pkg/c.py"}
    (tmp_path / "pkg").mkdir()
    known["pkg.a"].write_text("import importlib\n\ndef f():\n    from . import b\n    from pkg.c import thing\n"
                              "    return importlib.import_module('pkg')\n")
    assert _imports("pkg.a", known["pkg.a"], known) == {"pkg", "pkg.b", "pkg.c"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_between_project_modules():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the project
    cycles = find_cycles(graph)
    assert not cycles, "import circles (move the shared name to the module that owns it):\n" + "\n".join(
        _describe(c, graph) for c in cycles)
