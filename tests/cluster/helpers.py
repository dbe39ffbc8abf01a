"""Helpers for the cluster tests: a task the test holds open, the demo run, a copy of the checkout.

Importable by the clusters too (they run with the checkout as their working directory), which is
how ``hold_until`` reaches a worker as a django-q2 task."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil

from pipeline_ops.chaos.cluster import BASE_DIR


def hold_until(path: str, limit_seconds: float = 600.0) -> bool:
    """A task that runs until ``path`` exists: "busy" for exactly as long as the test wants.
    ``limit_seconds`` only frees the worker if a broken test never releases it."""
    deadline = time.monotonic() + limit_seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def copy_checkout(destination: Path) -> Path:
    """The working tree as it is now (tracked and new, not ignored files) copied to
    ``destination``, with ``.venv`` a symlink to this checkout's: nothing is installed again."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=BASE_DIR, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = BASE_DIR / name
        if not source.is_file():
            continue  # deleted in the working tree, or a submodule
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (destination / ".venv").symlink_to((BASE_DIR / ".venv").resolve(), target_is_directory=True)
    return destination


def run_demo(*, checkout: Path, python: str, var_dir: Path) -> subprocess.CompletedProcess:
    """``manage.py demo --no-serve --exit-when-done`` from ``checkout`` on its own embedded SQLite file."""
    env = {**os.environ, "DEBUG": "1", "PIPELINE_OPS_VAR_DIR": str(var_dir), "DJANGO_SETTINGS_MODULE": "pipeline_ops.settings",
           "PIPELINE_OPS_QUEUE": "pipeline_ops_demo_test"}
    env.pop("DATABASE_URL", None)  # the embedded default: pipeline_ops.sqlite3 under PIPELINE_OPS_VAR_DIR
    env.pop("SECRET_KEY", None)
    # The demo gives up by itself when its inputs stop progressing (--timeout: seconds without
    # progress); the subprocess timeout is only a hang guard.
    return subprocess.run(
        [python, "manage.py", "demo", "--no-serve", "--exit-when-done", "--timeout", "90"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=900,
    )


def assert_demo_succeeded(result: subprocess.CompletedProcess, var_dir: Path) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (var_dir / "pipeline_ops.sqlite3").exists()
    assert "[10/10]" in result.stdout
    # A generated password is printed once; no fixed password ships.
    login = next(line for line in result.stdout.splitlines() if "Log in as:" in line)
    password = login.split("/", 1)[1].split()[0]
    assert len(password) >= 12
    # Every input reached a terminal status, and no child (qcluster) outlived the command.
    assert "-> SUCCEEDED" in result.stdout
    assert demo_leftovers(var_dir) == []


def demo_leftovers(var_dir: Path) -> list[psutil.Process]:
    leftovers = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("PIPELINE_OPS_VAR_DIR") == str(var_dir):  # the demo's children carry it
                leftovers.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return leftovers

