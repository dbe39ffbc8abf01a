"""A command on a database it cannot use fails with one line and exit status 1, not a traceback:
a real ``manage.py`` process on an empty SQLite file and on a PostgreSQL port nobody listens on."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def manage(*args: str, database_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": database_url, "DEBUG": "1", "DJANGO_SETTINGS_MODULE": "pipeline_ops.settings"}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", [["pipeline_status"], ["retry_failed", "--reason", "r", "--dry-run"], ["verify_integrity"]])
def test_command_on_an_unmigrated_database_says_so_in_one_line(tmp_path, command):
    result = manage(*command, database_url=f"sqlite:///{tmp_path / 'empty.sqlite3'}")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"{command[0]}: the database is not migrated (no such table: ")
    assert "run `python manage.py migrate` first" in result.stderr


def test_command_on_an_unreachable_database_says_so_in_one_line():
    result = manage("pipeline_status", database_url=f"postgres://postgres@127.0.0.1:{closed_port()}/pipeline_ops")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("pipeline_status: database error: ") and "refused" in result.stderr


def test_traceback_flag_still_shows_the_whole_error(tmp_path):
    result = manage("pipeline_status", "--traceback", database_url=f"sqlite:///{tmp_path / 'empty.sqlite3'}")

    assert result.returncode != 0 and "Traceback" in result.stderr
