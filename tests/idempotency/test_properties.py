"""Property-based test of the guard: random interleavings of every move on one key.

Hypothesis generates a list of operations (claim, heartbeat, complete, fail, release, reopen, and
advancing a fake clock that every call receives as ``now=``) over several attempts of one key.
Before each operation the test reads the record from the database and predicts, from the
protocol alone, what the guard must answer; after it, it checks the invariants:

* at most one completion (one SUCCEEDED attempt, at most one Receipt row, written by it);
* the stored result never changes once the key is COMPLETED;
* attempt numbers are 1..n with no gap or repeat, increasing in start order, and ``attempt_count``
  is n;
* a move by an attempt that does not hold the key (fenced, superseded, failed, finished) changes
  nothing on the record, and writes no domain row;
* only the attempt holding the key can be RUNNING.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from idempotency import guard
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from tests.testapp.models import Receipt

from .helpers import RETRYING, at, claim, receipt_write

pytestmark = pytest.mark.django_db

KEY = "prop"
LEASE = 20
MAX_ATTEMPTS = 4  # bounds takeovers of expired leases, so dead-lettering is exercised too

attempt_ref = st.integers(min_value=0, max_value=7)
claim_op = st.tuples(st.just("claim"))
advance_op = st.tuples(st.just("advance"), st.integers(min_value=1, max_value=45))
complete_op = st.tuples(st.just("complete"), attempt_ref)
fail_op = st.tuples(st.just("fail"), attempt_ref, st.booleans(), st.booleans())  # outcome unknown?, transient?
# Branches repeated to weight them: claims, clock moves, completions and failures make the races.
operation = st.one_of(
    claim_op, claim_op, claim_op,
    advance_op, advance_op, advance_op,
    complete_op, complete_op,
    fail_op, fail_op,
    st.tuples(st.just("heartbeat"), attempt_ref),
    st.tuples(st.just("release")),
    st.tuples(st.just("reopen")),
)

FIELDS = [f.attname for f in IdempotencyRecord._meta.concrete_fields]


def snapshot() -> dict | None:
    return IdempotencyRecord.objects.filter(scope="test", key=KEY).values(*FIELDS).first()


def holds(snap: dict | None, attempt: Attempt) -> bool:
    return snap is not None and snap["status"] == RecordStatus.PROCESSING and snap["attempt_count"] == attempt.number


class Run:
    """One example: the attempts claimed so far, the fake clock and what was completed."""

    def __init__(self):
        self.t = 0
        self.attempts: list[Attempt] = []
        self.completed_result = None

    @property
    def now(self):
        return at(self.t)

    def step(self, op: tuple) -> None:
        kind = op[0]
        before = snapshot()
        receipts_before = Receipt.objects.count()
        if kind == "advance":
            self.t += op[1]
            return
        if kind == "claim":
            self.check_claim(before, claim(KEY, now=self.now, lease=LEASE, max_attempts=MAX_ATTEMPTS))
        elif kind == "release":
            released = guard.release(record=IdempotencyRecord(pk=before["id"]), reason="prop", now=self.now) if before else False
            assert released == (before is not None and before["status"] == RecordStatus.PROCESSING)
        elif kind == "reopen":
            reopened = guard.reopen(record=IdempotencyRecord(pk=before["id"]), now=self.now) if before else False
            assert reopened == (before is not None and before["status"] == RecordStatus.FAILED)
            if not reopened:
                assert snapshot() == before
        elif self.attempts:
            attempt = self.attempts[op[1] % len(self.attempts)]
            holder = holds(before, attempt)
            if kind == "heartbeat":
                assert guard.heartbeat(attempt=attempt, lease_seconds=LEASE, now=self.now) is holder
                if holder:
                    assert snapshot()["lease_expires_at"] == self.now + timedelta(seconds=LEASE)
            elif kind == "complete":
                result = {"by": attempt.number, "t": self.t}
                done = guard.complete(attempt=attempt, result=result, write=receipt_write(KEY, attempt), now=self.now)
                # The winner completing again is told so (not fenced); anyone else who does not hold the key is fenced.
                already_won = self.completed_result is not None and self.completed_result["by"] == attempt.number
                assert done.fenced is not (holder or already_won)
                event("complete -> fenced" if done.fenced else "complete -> won")
                if holder:
                    assert done.result == result
                    self.completed_result = result
                else:
                    assert done.result == self.completed_result  # the winner's, or None if nobody won yet
                    assert Receipt.objects.count() == receipts_before
            elif kind == "fail":
                error = TimeoutError("slow") if op[3] else ValueError("bad")
                outcome = guard.fail(attempt=attempt, error=error, policy=RETRYING, outcome_unknown=op[2], now=self.now)
                assert outcome.held is holder
            if not holder:
                assert snapshot() == before, f"{kind} by attempt #{attempt.number}, which does not hold the key, changed the record"
        self.check_invariants()

    def check_claim(self, before: dict | None, outcome) -> None:
        now = self.now
        if before is None:
            expected = "Claimed"
        elif before["status"] == RecordStatus.COMPLETED:
            expected = "Replay"
        elif before["status"] == RecordStatus.PROCESSING:
            if before["lease_expires_at"] > now:
                expected = "InFlight"
            else:
                expected = "Failed" if before["attempt_count"] >= MAX_ATTEMPTS else "Claimed"
        elif before["retry_at"] is None:
            expected = "Failed"
        else:
            expected = "InFlight" if before["retry_at"] > now else "Claimed"
        assert type(outcome).__name__ == expected, (before, now)
        event(f"claim -> {expected}")
        if isinstance(outcome, guard.Claimed):
            assert outcome.attempt.number == (before["attempt_count"] if before else 0) + 1
            self.attempts.append(outcome.attempt)
        elif isinstance(outcome, guard.Replay):
            assert outcome.result == self.completed_result
            assert snapshot()["replay_count"] == before["replay_count"] + 1
        elif isinstance(outcome, guard.InFlight):
            assert outcome.until == (before["lease_expires_at"] if before["status"] == RecordStatus.PROCESSING else before["retry_at"])
            assert snapshot() == before

    def check_invariants(self) -> None:
        record = snapshot()
        if record is None:
            return
        rows = list(Attempt.objects.filter(record_id=record["id"]).order_by("number").values("number", "status", "started_at"))
        numbers = [r["number"] for r in rows]
        assert numbers == list(range(1, len(rows) + 1))
        assert record["attempt_count"] == len(rows) == len(self.attempts)
        starts = [r["started_at"] for r in rows]
        assert starts == sorted(starts)
        succeeded = [r["number"] for r in rows if r["status"] == AttemptStatus.SUCCEEDED]
        assert len(succeeded) <= 1
        running = [r["number"] for r in rows if r["status"] == AttemptStatus.RUNNING]
        assert running in ([], [record["attempt_count"]]) and (not running or record["status"] == RecordStatus.PROCESSING)
        receipts = list(Receipt.objects.values_list("attempt_number", flat=True))
        if record["status"] == RecordStatus.COMPLETED:
            assert record["result"] == self.completed_result is not None
            assert receipts == succeeded == [self.completed_result["by"]]
        else:
            assert receipts == [] and succeeded == [] and self.completed_result is None


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation, min_size=1, max_size=30))
def test_guard_keeps_its_invariants_when_moves_interleave_randomly(ops):
    # One database transaction holds every example (pytest-django); start each from empty tables.
    Receipt.objects.all().delete()
    IdempotencyRecord.objects.all().delete()
    run = Run()
    for op in ops:
        run.step(op)
