"""The import graph of the safeloop package, read from its source, and the circles in it.

Two graphs: *run time* (every import that runs, lazy ones inside functions included) and *type
level* (those plus the imports under ``if TYPE_CHECKING:``). A circle is a set of modules that
import each other in a loop (a strongly connected component). The rule this checks: no circle at
run time, and at type level none but ``callbacks <-> trainer`` (a callback's hooks name the
trainer's type). Usage, from the repository root::

    python tools/import_graph.py            # prints both graphs' circles; exit 1 on a broken rule

``tests/unit/test_structure.py`` runs the same check.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ALLOWED_TYPE_CIRCLES = [{"safeloop.callbacks", "safeloop.trainer"}]


def module_names(root: Path, package: str = "safeloop") -> dict[str, Path]:
    """Every module of ``package`` under ``root``, by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, typing_only: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of ``tree`` with whether it sits under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, typing_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), typing_only)
        else:
            yield from _imports(node, typing_only)


def imported_modules(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, bool]]:
    """The package modules that module ``name`` imports, each with whether only for typing."""
    is_package = path.name == "__init__.py"
    for node, typing_only in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the module's package, `level` steps up
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:  # `import safeloop.x.y` reaches the known prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, typing_only


def import_graph(root: Path, package: str = "safeloop", *, type_level: bool) -> dict[str, set[str]]:
    """Edges module -> modules it imports (run time only, or with the typing-only ones)."""
    modules = module_names(root, package)
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, typing_only in imported_modules(name, path, known):
            if type_level or not typing_only:
                graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def broken_rules(root: Path) -> list[str]:
    """What breaks the rule: run-time circles, and type-level circles beyond the allowed pair."""
    at_run_time = circles(import_graph(root, type_level=False))
    problems = [f"run-time circle: {sorted(c)}" for c in at_run_time]
    for circle in circles(import_graph(root, type_level=True)):
        if circle not in ALLOWED_TYPE_CIRCLES and circle not in at_run_time:
            problems.append(f"type-level circle: {sorted(circle)}")
    return problems


def main() -> int:
    """Print the circles of both graphs; return 1 when the rule is broken."""
    root = Path(__file__).resolve().parents[1]
    for label, type_level in (("run time", False), ("type level", True)):
        graph = import_graph(root, type_level=type_level)
        found = circles(graph)
        edges = sum(len(targets) for targets in graph.values())
        print(f"{label}: {len(graph)} modules, {edges} imports, {len(found)} circle(s)")
        for circle in found:
            print("  circle:", " <-> ".join(sorted(circle)))
    problems = broken_rules(root)
    for problem in problems:
        print("BROKEN:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
