"""Crash points for the API's crash tests: a real SIGKILL of the serving process at a chosen
point of a submission, or a pause there (a slow first request).

Inert unless ``PIPELINE_OPS_API_FAULTS_DIR`` is set in the server's environment, which only the
tests do. A test arms a point by creating a file named after it in that directory; the first
request to reach the point removes the file (only one process can) and fires:

* ``kill_before_commit``: SIGKILL inside the transaction, after the input rows were written and
  before the stored response commits with them; the database rolls both back.
* ``kill_after_commit``: SIGKILL after the commit, before the response is sent.
* ``error_before_commit``: raise an unexpected error at the same point (a server error: 500).
* ``sleep_before_work``: the file holds a number of seconds; sleep that long after claiming the
  key and before doing the work (the first request is "still running").
* ``hold_before_work``: at the same point, create ``hold_before_work.held`` and wait until the
  test creates ``hold_before_work.release``, heartbeating the attempt's lease meanwhile: the
  first request is "still running" for exactly as long as the test wants, however slow the
  machine (the file may hold a safety limit in seconds, default 300).
"""
from __future__ import annotations

import os
import signal
import time

KILL_BEFORE_COMMIT = "kill_before_commit"
KILL_AFTER_COMMIT = "kill_after_commit"
ERROR_BEFORE_COMMIT = "error_before_commit"
SLEEP_BEFORE_WORK = "sleep_before_work"
HOLD_BEFORE_WORK = "hold_before_work"
HELD_SUFFIX = ".held"
RELEASE_SUFFIX = ".release"
HOLD_HEARTBEAT_SECONDS = 1.0


def _faults_dir() -> str:
    return os.environ.get("PIPELINE_OPS_API_FAULTS_DIR", "")


def fault_point(name: str, *, attempt=None) -> None:
    """Fire the fault armed for ``name``, if any (see the module doc). ``attempt``: the claimed
    attempt, whose lease a hold keeps alive."""
    directory = _faults_dir()
    if not directory:
        return
    path = os.path.join(directory, name)
    try:
        with open(path) as armed:
            argument = armed.read().strip()
        os.remove(path)  # exactly one process wins the remove, so a fault fires once
    except FileNotFoundError:
        return
    if name.startswith("kill_"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif name.startswith("error_"):
        raise RuntimeError(f"injected fault {name!r} (tests only)")
    elif name.startswith("sleep_"):
        time.sleep(float(argument or "1"))
    elif name.startswith("hold_"):
        _hold(os.path.join(directory, name), attempt=attempt, limit_seconds=float(argument or "300"))


def _hold(path: str, *, attempt, limit_seconds: float) -> None:
    open(path + HELD_SUFFIX, "w").close()  # the test waits for this: the key is claimed and held
    deadline = time.monotonic() + limit_seconds
    last_beat = time.monotonic()
    while not os.path.exists(path + RELEASE_SUFFIX) and time.monotonic() < deadline:
        if attempt is not None and time.monotonic() - last_beat >= HOLD_HEARTBEAT_SECONDS:
            from idempotency import guard

            guard.heartbeat(attempt=attempt)  # a held request is alive: its lease must not run out
            last_beat = time.monotonic()
        time.sleep(0.02)
