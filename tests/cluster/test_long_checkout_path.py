"""The product from a checkout whose path holds a 200+ character folder name.

Why: django-q2 titles its processes with setproctitle, which pads the rest of the original
command line (``<checkout>/.venv/bin/python manage.py qcluster``) with NULs; psutil returns that
padding as trailing empty strings. Readiness that matched titles never saw a ready cluster from a
long checkout path, and ``make run`` (the demo) failed with "the worker cluster did not start".
These tests copy the working tree under such a path (its ``.venv`` a symlink to this one's, so
the interpreter's own path is long too) and run the demo and the harness tests from there.
"""
from __future__ import annotations

import os
import subprocess

import pytest
from django.conf import settings
from django.db import connection

from .helpers import assert_demo_succeeded, copy_checkout, run_demo

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LONG_FOLDER = "a-checkout-under-a-folder-whose-name-is-long-" + "x" * 170  # 215 characters


@pytest.fixture(scope="module")
def long_checkout(tmp_path_factory):
    assert len(LONG_FOLDER) >= 200
    checkout = copy_checkout(tmp_path_factory.mktemp("longpath") / LONG_FOLDER)
    python = str(checkout / ".venv" / "bin" / "python")  # through the long path, not resolved
    return checkout, python


def test_demo_runs_every_input_to_the_end_when_the_checkout_path_has_a_200_character_folder(long_checkout, tmp_path):
    if connection.vendor != "sqlite":
        pytest.skip("the demo runs on its own embedded SQLite file: once per suite, in the SQLite pass")
    checkout, python = long_checkout
    var_dir = checkout / "var" / "demo-under-test"
    result = run_demo(checkout=checkout, python=python, var_dir=var_dir)
    assert_demo_succeeded(result, var_dir)


def test_harness_sees_a_ready_cluster_when_the_checkout_path_has_a_200_character_folder(long_checkout):
    checkout, python = long_checkout
    env = {**os.environ, "TEST_DB_TAG": f"{settings.TEST_DB_TAG}_longpath"}
    env.pop("PIPELINE_OPS_VAR_DIR", None)  # the copy's own var/
    if connection.vendor == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{checkout / 'var' / 'app-under-test.sqlite3'}"
    # On PostgreSQL the parent's DATABASE_URL stays: the tag gives the copy its own test database.
    # Nested pytest: the harness tests as they are, readiness, respawn, busy workers and all. The
    # waits inside fail fast on a dead or stalled cluster; the timeout here is only a hang guard.
    result = subprocess.run(
        [python, "-m", "pytest", "tests/cluster/test_harness.py", "-q", "-x", "-p", "no:cacheprovider"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
