"""A holder in its own OS process, for the liveness tests (test_liveness.py); not a test itself.

Started as ``python -m tests.idempotency.liveness_child SCOPE KEY LEASE [--no-lock] [--max-attempts N]``
with DJANGO_SETTINGS_MODULE=tests.settings and DATABASE_URL pointing at the *test* database. It
claims the key through the guard and runs under ``idempotency.heartbeat.Heartbeat`` exactly as
the API's requests do, then answers one line ``HOLDER {"attempt": ..., "lock_held": ...}`` once
it holds its liveness lock (at once with ``--no-lock``, which turns ``LIVENESS_LOCKS`` off) and
waits. The parent either SIGKILLs it, or writes ``complete`` on stdin: it then completes the key
under its heartbeat and answers ``HOLDER {"completed": ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import django

MARK = "HOLDER "


def answer(payload: dict) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scope")
    parser.add_argument("key")
    parser.add_argument("lease", type=float)
    parser.add_argument("--no-lock", action="store_true")
    parser.add_argument("--max-attempts", type=int, default=None)
    args = parser.parse_args()
    django.setup()
    from django.conf import settings
    from django.db import connection

    if args.no_lock:
        settings.IDEMPOTENCY = {**getattr(settings, "IDEMPOTENCY", {}), "LIVENESS_LOCKS": False}

    from idempotency import guard
    from idempotency.fingerprint import fingerprint
    from idempotency.heartbeat import Heartbeat

    outcome = guard.claim(
        scope=args.scope, key=args.key, operation="charge", fingerprint=fingerprint({"amount": 5}),
        lease_seconds=args.lease, max_attempts=args.max_attempts, worker=f"liveness-child:{os.getpid()}",
    )
    if not isinstance(outcome, guard.Claimed):
        answer({"error": f"not claimed: {type(outcome).__name__}"})
        return
    attempt = outcome.attempt
    stop = threading.Event()
    with Heartbeat(attempt=attempt, lease_seconds=args.lease, stop_event=stop) as heartbeat:
        deadline = time.monotonic() + 30
        while not args.no_lock and not heartbeat.lock_held and time.monotonic() < deadline:
            time.sleep(0.01)
        answer({"attempt": str(attempt.pk), "number": attempt.number, "lock_held": heartbeat.lock_held})
        command = sys.stdin.readline().strip()
        if command == "complete":
            done = guard.complete(attempt=attempt, result={"by": attempt.number})
            answer({"completed": not done.fenced, "stopped": stop.is_set()})
    connection.close()


if __name__ == "__main__":
    main()
