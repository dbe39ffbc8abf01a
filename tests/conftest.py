"""Shared fixtures. The same suite runs on SQLite and on PostgreSQL (tests/run_suite.sh)."""
from __future__ import annotations

import pytest
from django.db import connection


def pytest_collection_modifyitems(config, items):
    # Races between real OS processes need a server database; the PostgreSQL pass runs them.
    if connection.vendor != "postgresql":
        skip = pytest.mark.skip(reason="needs PostgreSQL: runs in the PostgreSQL pass of `make test`")
        for item in items:
            if "postgres" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def db_vendor() -> str:
    return connection.vendor


@pytest.fixture(autouse=True)
def fresh_log_context():
    """Every test starts with no log fields bound: a test that calls a service directly (not
    through its isolated task) binds input/step/attempt in the main thread, which a later test
    of the log lines would otherwise see, depending on the order the files run in."""
    from pipeline_ops.observability.logging import _context

    token = _context.set({})
    yield
    _context.reset(token)
