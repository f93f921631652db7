"""The benchmark scripts are not run by the test suite (they are long), so a moved or renamed library name would only
show when someone runs one. This reads every `from vitforge... import ...` in benchmarks/*.py and checks that the
module and each name exist."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def _vitforge_imports(path: Path) -> list[tuple[str, str]]:
    return [(node.module, alias.name) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vitforge"
            for alias in node.names]


def test_there_are_benchmarks_that_import_vitforge():
    assert sum(bool(_vitforge_imports(p)) for p in BENCHMARKS) >= 5


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(path):
    for module, name in _vitforge_imports(path):
        mod = importlib.import_module(module)
        if not hasattr(mod, name):  # a submodule imported by name (from vitforge.export import onnx)
            importlib.import_module(f"{module}.{name}")
