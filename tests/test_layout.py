"""The code's layout: the import direction (import-linter's contracts in pyproject.toml, `lint-imports`), no import
cycle among the modules of the core and its edges, and module sizes (none over MAX_LINES)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The core and its edges: the packages the cycle and size rules cover (the tests are not held to them).
PACKAGES = ("asif", "cli", "app", "index_builder", "evaluation", "bench")
MAX_LINES = 400


def lint_imports() -> str:
    """The `lint-imports` next to this interpreter (the dev extra installs it), else the one on PATH."""
    local = Path(sys.executable).with_name("lint-imports")
    found = str(local) if local.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports not found: install the dev extra (pip install -e '.[dev]'), it brings import-linter")
    return found


def test_import_contracts_are_kept() -> None:
    """Every contract of [tool.importlinter]: the core imports no edge, its subpackages only downwards, the edges
    apart where they are apart."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [lint_imports(), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def all_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that a module imports, at the top or inside a function (a lazy import is still a
    dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}: relative import; the code uses absolute imports only")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    """No chain of imports among the modules of the core and its edges comes back to where it started, lazy imports
    included (bench/run.py, bench/live_traffic.py and bench/stores.py once went round in one)."""
    modules = all_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert len(graph) > 90 and graph["asif.serving.model"] and graph["bench.run"]
    assert cycles(graph) == []


def line_counts() -> dict[str, int]:
    counts = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            counts[path.relative_to(ROOT).as_posix()] = len(path.read_text().splitlines())
    return counts


def test_no_module_is_over_the_limit() -> None:
    counts = line_counts()
    over = sorted(name for name, n in counts.items() if n > MAX_LINES)
    assert len(counts) > 100 and over == [], f"over {MAX_LINES} lines, split by responsibility: {over}"
