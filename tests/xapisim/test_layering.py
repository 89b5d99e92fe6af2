"""xapisim's import graph: acyclic, standard library only, nothing from the console.

Read with ``ast``, not by importing: a module-level import (outside
``if TYPE_CHECKING:``) is one that runs when the module is loaded, and those
must form a DAG, so that no module needs a lazy import to dodge a cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "xapisim"
CONSOLE = {"eac", "inventory", "protection", "alerts", "console", "am"}
# The package's __getattr__ imports the server on first use of xapisim.Simulator,
# so that "python -m xapisim" and "import xapisim.planner" stay light: not a cycle dodge.
LAZY_ALLOWED = {("xapisim", "xapisim.server")}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = "xapisim" if path.stem == "__init__" else f"xapisim.{path.stem}"
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    nodes: Iterable[ast.AST], *, functions: bool, type_checking: bool
) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among ``nodes``, looking into function bodies and TYPE_CHECKING blocks or not."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if functions:
                yield from _imports(ast.iter_child_nodes(node), functions=functions, type_checking=type_checking)
        elif _is_type_checking(node):
            if type_checking:
                yield from _imports(node.body, functions=functions, type_checking=type_checking)
            yield from _imports(node.orelse, functions=functions, type_checking=type_checking)
        else:
            yield from _imports(ast.iter_child_nodes(node), functions=functions, type_checking=type_checking)


def runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """What runs when the module is loaded: not in a function, not under ``if TYPE_CHECKING:``."""
    return list(_imports(tree.body, functions=False, type_checking=False))


def all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return list(_imports(tree.body, functions=True, type_checking=True))


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return list(_imports(tree.body, functions=False, type_checking=True))


def _targets(module: str, stmt: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names imported by one statement (``from . import a`` names ``xapisim.a``)."""
    if isinstance(stmt, ast.Import):
        return [alias.name for alias in stmt.names]
    if stmt.level:
        package = module if module == "xapisim" else module.rsplit(".", 1)[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - stmt.level + 1])
        base = f"{base}.{stmt.module}" if stmt.module else base
    else:
        base = stmt.module or ""
    submodules = [f"{base}.{alias.name}" for alias in stmt.names if f"{base}.{alias.name}" in MODULES]
    return submodules or [base]


def _runtime_graph() -> dict[str, set[str]]:
    return {
        module: {
            target
            for stmt in runtime_imports(tree)
            for target in _targets(module, stmt)
            if target in MODULES and target != module
        }
        for module, tree in MODULES.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_cycle_finder_reports_a_cycle_and_accepts_a_dag():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_package_has_no_import_cycles():
    graph = _runtime_graph()
    assert graph["xapisim.engine"], "the walk must see the engine's imports"
    assert "xapisim.engine" in graph["xapisim.ha_restart"], "imports of names from a module count"
    cycle = _find_cycle(graph)
    assert cycle is None, "runtime import cycle: " + " -> ".join(cycle or [])


def test_package_imports_nothing_from_the_console_and_only_the_standard_library():
    for module, tree in MODULES.items():
        for stmt in all_imports(tree):
            for target in _targets(module, stmt):
                top = target.split(".")[0]
                assert top not in CONSOLE, f"{module} imports {target} from the console"
                assert top == "xapisim" or top in sys.stdlib_module_names or top == "__future__", (
                    f"{module} imports {target}, which is not in the standard library"
                )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_lazy_imports_and_no_private_names_imported_across_modules(module):
    tree = MODULES[module]
    module_level = {id(stmt) for stmt in module_level_imports(tree)}
    for stmt in all_imports(tree):
        targets = [t for t in _targets(module, stmt) if t.split(".")[0] == "xapisim"]
        if not targets:
            continue
        if id(stmt) not in module_level:
            assert all((module, t) in LAZY_ALLOWED for t in targets), (
                f"{module} line {stmt.lineno} imports {targets} inside a function: "
                "a lazy import dodging a cycle means something sits in the wrong module"
            )
        if isinstance(stmt, ast.ImportFrom):
            private = [alias.name for alias in stmt.names if alias.name.startswith("_")]
            assert not private, f"{module} line {stmt.lineno} imports private {private} from {targets}"


def test_only_the_command_line_imports_the_live_bed():
    """The simulator runs without ``xapisim.live`` (root, namespaces, the ``am`` package): only ``--live`` needs it."""
    assert any(
        target.startswith("xapisim.live")
        for stmt in all_imports(MODULES["xapisim.__main__"])
        for target in _targets("xapisim.__main__", stmt)
    ), "the walk must see __main__'s import of the live bed"
    for module, tree in MODULES.items():
        if module == "xapisim.__main__":
            continue
        for stmt in all_imports(tree):
            targets = [t for t in _targets(module, stmt) if t.startswith("xapisim.live")]
            assert not targets, f"{module} imports {targets}: the live bed sits above the simulator"
