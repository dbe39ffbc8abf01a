"""A racer: one OS process of the PostgreSQL race tests (test_races.py), not a test itself.

Started as ``python -m tests.idempotency.race_child`` with DJANGO_SETTINGS_MODULE=tests.settings
and DATABASE_URL pointing at the *test* database. It reads one JSON command per line on stdin and
answers one JSON line on stdout. A command runs in two phases so the parent can line every racer
up first: "prepare" does the slow part (loading rows) and answers "ready"; the following "go"
line runs the contested call. That is the barrier.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime

import django

MARK = "RACER "


def answer(payload: dict) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def main() -> None:
    django.setup()
    from django.db import connection

    from idempotency import guard
    from idempotency.models import Attempt
    from tests.testapp.models import Charge

    connection.ensure_connection()  # connect before the barrier, not during the race
    answer({"up": True})
    for line in sys.stdin:
        command = json.loads(line)
        now = datetime.fromisoformat(command["now"])
        attempt = None
        if command["op"] == "complete":
            attempt = Attempt.objects.get(pk=command["attempt_id"])
        answer({"ready": True})
        sys.stdin.readline()  # "go"
        if command["op"] == "claim":
            outcome = guard.claim(
                scope=command["scope"], key=command["key"], operation="charge", fingerprint=command["fingerprint"],
                lease_seconds=command["lease"], worker=command["worker"], now=now,
            )
            number = outcome.attempt.number if isinstance(outcome, guard.Claimed) else None
            answer({"outcome": type(outcome).__name__, "number": number})
        elif command["op"] == "complete":
            key = command["key"]
            done = guard.complete(
                attempt=attempt, result={"by": attempt.number},
                write=lambda: Charge.objects.create(key=key, attempt_number=attempt.number),
                now=now,
            )
            answer({"number": attempt.number, "fenced": done.fenced, "result": done.result})
        else:
            answer({"error": f"unknown op {command['op']!r}"})
    # stdin closed: the parent is done. Skip interpreter teardown (32 of them at once are slow on
    # a small machine); the connection is closed first so the server sees a clean goodbye.
    connection.close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
