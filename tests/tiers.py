"""Which tier a test belongs to: `slow` when it starts processes, found by reading its code.

A test that starts processes (the CLI through `run_cli`, a sweep, the benchmark, Chromium, the
dashboard, PostgreSQL through the `pg` fixture) takes seconds to minutes on 2 cores; the rest take
milliseconds. Rather than a hand-written mark that a new test can forget, conftest marks a test `slow`
when a name in SLOW_NAMES appears in the test, in a fixture it uses, or in a helper of tests/ that
either calls, so `make test-fast` (`-m "not slow and not integration"`) keeps to the unit tests.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import pytest

SLOW_NAMES = frozenset({"run_cli", "subprocess", "pg"})


def names_used(func: Any, seen: set[types.CodeType] | None = None) -> set[str]:
    """Global and attribute names ``func`` uses (nested functions and lambdas included), following the
    functions of the tests package it refers to; code outside tests/ is not read."""
    seen = set() if seen is None else seen
    code = getattr(inspect.unwrap(func), "__code__", None)
    if code is None or code in seen:
        return set()
    seen.add(code)
    names: set[str] = set()
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    for name in list(names):
        target = func.__globals__.get(name) if hasattr(func, "__globals__") else None
        if inspect.isfunction(target) and target.__module__.split(".")[0] == "tests":
            names |= names_used(target, seen)
    return names


def starts_processes(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    if function is None:
        return False
    fixturenames = set(getattr(item, "fixturenames", ()))
    if fixturenames & SLOW_NAMES:
        return True
    seen: set[types.CodeType] = set()
    names = names_used(function, seen)
    fixturedefs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in fixturenames:
        for fixturedef in fixturedefs.get(name, ()):
            names |= names_used(fixturedef.func, seen)
    return bool(names & SLOW_NAMES)


def mark_slow(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is None and starts_processes(item):
            item.add_marker(pytest.mark.slow)
