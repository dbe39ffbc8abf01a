"""``manage.py demo`` (what ``make run`` calls), non-interactively, on its own embedded SQLite file."""
from __future__ import annotations

import sys

import pytest
from django.db import connection

from pipeline_ops.chaos.cluster import BASE_DIR

from .helpers import assert_demo_succeeded, run_demo

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_demo_runs_every_input_to_the_end_and_stops_its_children_when_exit_when_done(tmp_path):
    if connection.vendor != "sqlite":
        pytest.skip("the demo runs on its own embedded SQLite file: once per suite, in the SQLite pass")
    result = run_demo(checkout=BASE_DIR, python=sys.executable, var_dir=tmp_path)
    assert_demo_succeeded(result, tmp_path)
