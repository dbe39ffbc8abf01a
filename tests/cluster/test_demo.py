"""``manage.py demo`` (what ``make run`` calls), non-interactively, on its own embedded SQLite file."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from django.db import connection

from pipeline_ops.chaos.cluster import BASE_DIR

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_demo_runs_every_input_to_the_end_and_stops_its_children_when_exit_when_done(tmp_path):
    if connection.vendor != "sqlite":
        pytest.skip("the demo runs on its own embedded SQLite file: once per suite, in the SQLite pass")
    env = {**os.environ, "DEBUG": "1", "PIPELINE_OPS_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "pipeline_ops.settings",
           "PIPELINE_OPS_QUEUE": "pipeline_ops_demo_test"}
    env.pop("DATABASE_URL", None)  # the embedded default: var/pipeline_ops.sqlite3 under PIPELINE_OPS_VAR_DIR
    env.pop("SECRET_KEY", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "demo", "--no-serve", "--exit-when-done", "--timeout", "90"],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "pipeline_ops.sqlite3").exists()
    assert "[10/10]" in result.stdout
    # A generated password is printed once; no fixed password ships.
    login = next(line for line in result.stdout.splitlines() if "Log in as:" in line)
    password = login.split("/", 1)[1].split()[0]
    assert len(password) >= 12
    # Every input reached a terminal status, and no child (qcluster) outlived the command.
    assert "-> SUCCEEDED" in result.stdout
    leftovers = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("PIPELINE_OPS_VAR_DIR") == str(tmp_path):  # the demo's children carry it
                leftovers.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    assert leftovers == []
