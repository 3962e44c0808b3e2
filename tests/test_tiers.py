"""The rule that puts a test in the slow tier (tests/tiers.py), on stand-in tests and fixtures."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

from src import runtime
from tests import tiers
from tests.conftest import run_cli


def _cli_helper() -> None:  # never called: only its names are read
    run_cli(["--help"], cwd=Path("."))


def _calls_the_helper() -> None:
    _cli_helper()


def _item(function, fixtures: dict | None = None) -> SimpleNamespace:
    """What the rule reads of a collected test: its function, fixture names and fixture functions."""
    fixtures = fixtures or {}
    return SimpleNamespace(function=function, fixturenames=list(fixtures),
                           _fixtureinfo=SimpleNamespace(name2fixturedefs={
                               name: [SimpleNamespace(func=f)] for name, f in fixtures.items()}))


def test_a_test_calling_a_helper_that_runs_the_cli_is_slow():
    assert tiers.starts_processes(_item(lambda: _calls_the_helper()))


def test_subprocess_in_a_nested_function_counts():
    def outer() -> None:
        def inner() -> None:
            subprocess.run(["true"], check=True)
        inner()

    assert tiers.starts_processes(_item(outer))


def test_a_fixture_that_runs_the_cli_or_the_pg_fixture_makes_a_test_slow():
    assert tiers.starts_processes(_item(lambda: None, {"sweep": _calls_the_helper}))
    assert tiers.starts_processes(_item(lambda: None, {"pg": lambda: None}))


def test_pure_tests_and_code_outside_tests_stay_fast():
    assert not tiers.starts_processes(_item(lambda: sorted([2, 1]), {"tmp_path": lambda: None}))
    # runtime.run_worker starts a process itself, but the rule reads only the tests package's code:
    # a test that calls it is judged by its own names
    assert "subprocess" not in tiers.names_used(lambda: runtime.run_worker)


def test_the_markers_are_declared_and_strict(pytestconfig):
    declared = [m.split(":")[0] for m in pytestconfig.getini("markers")]
    assert {"slow", "integration"} <= set(declared)
    assert pytestconfig.getoption("strict_markers")

