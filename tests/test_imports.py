"""The import structure: no cycle between the project's modules (imports inside functions count: they
only hide a cycle), and the config schema imported only by the command-line shells, bench and tests."""

from __future__ import annotations

import ast
from pathlib import Path

from src.paths import PROJECT_ROOT

PACKAGES = ("src", "analysis", "bench", "hydra_plugins")
# Entry points (and the Hydra plugin shell): what may import the schema in src/config.py.
SCHEMA_USERS = {"src.train", "src.prepare_data", "src.plan", "src.config"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (PROJECT_ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth of its code. ``from pkg import mod`` is an
    import of pkg.mod; ``from pkg import name`` of pkg."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_only_the_shells_bench_and_tests_import_the_config_schema():
    users = {m for m, deps in import_graph().items() if "src.config" in deps}
    assert users - SCHEMA_USERS - {m for m in users if m.startswith("bench")} == set()


def test_leaf_modules_import_nothing_of_the_project():
    graph = import_graph()
    assert {m: graph[m] for m in ("src.paths", "src.hw", "src.redact", "src.metrics")} == \
        {m: set() for m in ("src.paths", "src.hw", "src.redact", "src.metrics")}
