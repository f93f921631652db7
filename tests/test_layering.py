"""The package is one strict stack: a module imports only from layers below it (or from earlier modules of its own
package, without loops), and never imports vitforge code inside a function (those are kept for optional
third-party packages). Read statically from the source, so a loop hidden in a function body fails here too.

    errors < version < constants < resources < config < outputs < progress < runtime   (foundations, in order)
    < models < data < checkpoint < eval < {export, train, serve} < commands
    (the package `vitforge/__init__.py` and `__main__.py` sit on top)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitforge"
LAYERS = [["errors"], ["version"], ["constants"], ["resources"], ["config"], ["outputs"], ["progress"], ["runtime"],
          ["models"], ["data"], ["checkpoint"], ["eval"], ["export", "train", "serve"], ["commands"],
          ["__init__", "__main__"]]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def top_unit(module: str) -> str:
    """The stack unit of a module: `vitforge.models.vit` -> models; the package itself -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def resolve(module: str, node: ast.ImportFrom | ast.Import, is_pkg: bool, known: set[str]) -> list[str]:
    """The vitforge modules an import statement reads (a `from pkg import submodule` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "vitforge"]
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "vitforge":
        return []
    out = []
    for a in node.names:
        sub = f"{target}.{a.name}"
        out.append(sub if sub in known else target)
    return out


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    nested: list[str] = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = resolve(mod, node, path.name == "__init__.py", known)
            if not targets:
                continue
            guarded = id(node) not in top_level and not _in_type_checking(tree, node)
            if guarded and _inside_function(tree, node):
                nested.append(f"{path.relative_to(SRC.parent)}:{node.lineno} imports {', '.join(targets)}")
            graph[mod].update(t for t in targets if t != mod)
    return graph, nested


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            if any(n is node for n in ast.walk(stmt)):
                return True
    return False


def _inside_function(tree: ast.Module, node: ast.AST) -> bool:
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(n is node for n in ast.walk(fn)):
            return True
    return False


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_module_has_a_layer():
    graph, _ = import_graph()
    unplaced = sorted({top_unit(m) for m in graph} - set(RANK))
    assert not unplaced, f"modules outside the stack (add them to LAYERS): {unplaced}"


def test_no_function_level_imports_of_vitforge():
    _, nested = import_graph()
    assert not nested, "function-level vitforge imports (move them to the top of the module):\n" + "\n".join(nested)


def test_no_upward_or_sideways_imports():
    graph, _ = import_graph()
    bad = []
    for mod, targets in graph.items():
        for t in targets:
            a, b = top_unit(mod), top_unit(t)
            if a == b:
                continue  # inside one package: only loops are forbidden (next test)
            if a in RANK and b in RANK and RANK[b] >= RANK[a]:
                bad.append(f"{mod} -> {t} ({a} may not import {b})")
    assert not bad, "imports that do not go down the stack:\n" + "\n".join(sorted(bad))


def test_no_import_loops():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, expect", [
    ("a", None),  # the checker itself finds loops and passes a clean graph
    ("loop", ["x", "y", "x"]),
])
def test_cycle_finder(source, expect):
    graph = {"x": {"y"}, "y": set()} if source == "a" else {"x": {"y"}, "y": {"x"}}
    assert find_cycle(graph) == expect
