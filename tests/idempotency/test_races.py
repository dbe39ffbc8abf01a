"""Races between 32 real OS processes on PostgreSQL (the database arbitrates, not Python).

Each racer is a separate interpreter (``race_child.py``) connected to the test database. The
racers are started once for the module (starting 32 interpreters is the slow part on a small
machine) and lined up behind a barrier before every contested call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from django.db import connection

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from tests.testapp.models import Charge

from .helpers import FP, LEASE_SECONDS, SCOPE, at, claimed

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

RACERS = 32
ROOT = Path(__file__).resolve().parents[2]


class Racers:
    def __init__(self, database_url: str):
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.idempotency.race_child"], cwd=ROOT, env=env, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            for _ in range(RACERS)
        ]
        for proc in self.procs:
            self._read(proc)  # {"up": true}: connected to the test database

    def _read(self, proc) -> dict:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"racer {proc.pid} died: {proc.stderr.read()}")
            if line.startswith("RACER "):
                return json.loads(line[len("RACER "):])

    def race(self, commands: list[dict]) -> list[dict]:
        """Send each racer its command, wait until all are ready, then release them together."""
        for proc, command in zip(self.procs, commands, strict=True):
            proc.stdin.write(json.dumps(command) + "\n")
            proc.stdin.flush()
        for proc in self.procs:
            assert self._read(proc) == {"ready": True}
        for proc in self.procs:  # the barrier opens: one short write per racer
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [self._read(proc) for proc in self.procs]

    def close(self):
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def racers(django_db_setup, django_db_blocker):
    settings = connection.settings_dict  # after django_db_setup: NAME is the test database
    user = settings["USER"] or "postgres"
    password = f":{settings['PASSWORD']}" if settings["PASSWORD"] else ""
    url = f"postgres://{user}{password}@{settings['HOST'] or '127.0.0.1'}:{settings['PORT'] or 5432}/{settings['NAME']}"
    assert settings["NAME"].startswith("test_"), "racers must use the test database"
    pool = Racers(url)
    yield pool
    pool.close()


def claim_command(i: int, *, key: str, now) -> dict:
    return {"op": "claim", "scope": SCOPE, "key": key, "fingerprint": FP, "lease": LEASE_SECONDS,
            "worker": f"racer-{i}", "now": now.isoformat()}


def test_exactly_one_process_claims_when_32_processes_claim_a_new_key_at_once(racers):
    results = racers.race([claim_command(i, key="new-key", now=at(0)) for i in range(RACERS)])

    assert Counter(r["outcome"] for r in results) == {"Claimed": 1, "InFlight": RACERS - 1}
    assert [r["number"] for r in results if r["outcome"] == "Claimed"] == [1]
    record = IdempotencyRecord.objects.get(key="new-key")
    assert (record.status, record.attempt_count) == (RecordStatus.PROCESSING, 1)
    assert Attempt.objects.filter(record=record).count() == 1


def test_exactly_one_process_takes_over_when_32_processes_claim_an_expired_lease_at_once(racers):
    claimed("expired-key", now=at(0))

    results = racers.race([claim_command(i, key="expired-key", now=at(LEASE_SECONDS + 1)) for i in range(RACERS)])

    assert Counter(r["outcome"] for r in results) == {"Claimed": 1, "InFlight": RACERS - 1}
    assert [r["number"] for r in results if r["outcome"] == "Claimed"] == [2]
    assert dict(Attempt.objects.values_list("number", "status")) == {1: AttemptStatus.TIMED_OUT, 2: AttemptStatus.RUNNING}


def test_exactly_one_domain_row_when_32_processes_complete_competing_attempts_at_once(racers):
    # 32 attempts of one key, each taking over from the last when its lease ran out.
    attempts = [claimed("contested", now=at(i * (LEASE_SECONDS + 1))) for i in range(RACERS)]
    assert [a.number for a in attempts] == list(range(1, RACERS + 1))
    late = at(RACERS * (LEASE_SECONDS + 1))

    results = racers.race([
        {"op": "complete", "attempt_id": str(a.pk), "key": "contested", "now": late.isoformat()} for a in attempts
    ])

    # Charge has no unique constraint: the database would take all 32 rows; the guard kept one.
    assert list(Charge.objects.filter(key="contested").values_list("attempt_number", flat=True)) == [RACERS]
    by_number = {r["number"]: r for r in results}
    assert by_number[RACERS]["fenced"] is False
    assert all(by_number[n]["fenced"] for n in range(1, RACERS))
    # A loser fenced after the winner committed is handed the winner's result; before that, nothing yet.
    assert {json.dumps(by_number[n]["result"]) for n in range(1, RACERS)} <= {"null", json.dumps({"by": RACERS})}
    statuses = dict(Attempt.objects.values_list("number", "status"))
    assert statuses == {n: AttemptStatus.FENCED for n in range(1, RACERS)} | {RACERS: AttemptStatus.SUCCEEDED}
    record = IdempotencyRecord.objects.get(key="contested")
    assert (record.status, record.result, record.attempt_count) == (RecordStatus.COMPLETED, {"by": RACERS}, RACERS)
