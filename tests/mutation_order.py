"""A pytest plugin, active under mutmut only: tests that start no server run first.

mutmut runs a mutant's tests until the first failure, in the order it passes them (its fork
server does not sort them by duration), and most server tests start a server for their
module. A mutant that a unit test kills should cost that unit test, not the servers of every
module ahead of it. Outside a mutation run (no MUTANT_UNDER_TEST) pytest's order stands, so
that each module's server starts once."""

from __future__ import annotations

import os

import pytest

# Fixtures that start a server (server_helpers.py, test_errors.py, test_hardening.py); a
# test's fixturenames hold every fixture it needs, through other fixtures too.
SERVER_FIXTURES = {"server", "keyed", "impatient"}


def _starts_a_server(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    calls = function.__code__.co_names if function is not None else ()
    fixtures = set(getattr(item, "fixturenames", ()))
    return bool(SERVER_FIXTURES & fixtures) or "running_server" in calls


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MUTANT_UNDER_TEST"):
        items.sort(key=_starts_a_server)  # stable: pytest's order within each group
