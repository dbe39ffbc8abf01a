"""The guard's claim outcomes and the moves of an attempt (idempotency/guard.py), on SQLite and PostgreSQL.

Time is passed as ``now=``: a lease "expires" because the test says the clock moved, not because it slept.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import IntegrityError

from idempotency import guard
from idempotency.fingerprint import fingerprint
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from tests.testapp.models import Receipt

from .helpers import FP, LEASE_SECONDS, OPERATION, RETRYING, at, claim, claimed, complete_with_receipt, receipt_write

pytestmark = pytest.mark.django_db


class Work:
    """The guarded work, counting how often it really ran."""

    def __init__(self):
        self.calls = 0

    def __call__(self, key: str, *, now):
        outcome = claim(key, now=now)
        if isinstance(outcome, guard.Claimed):
            self.calls += 1
            done = complete_with_receipt(outcome.attempt, key=key, now=now, result={"receipt": f"r-{key}", "n": self.calls})
            return "ran", done.result
        if isinstance(outcome, guard.Replay):
            return "replayed", outcome.result
        return type(outcome).__name__, None


# --- 1. each claim outcome ------------------------------------------------------------------------


def test_claim_returns_attempt_one_holding_a_lease_when_key_is_new(record_of):
    outcome = claim("k", now=at(0), worker="host-a:1")

    assert isinstance(outcome, guard.Claimed)
    attempt = outcome.attempt
    assert (attempt.number, attempt.status, attempt.worker, attempt.started_at) == (1, AttemptStatus.RUNNING, "host-a:1", at(0))
    record = record_of("k")
    assert record.status == RecordStatus.PROCESSING
    assert record.attempt_count == 1
    assert record.lease_expires_at == at(LEASE_SECONDS)
    assert (record.operation, record.fingerprint) == (OPERATION, FP)


def test_claim_replays_stored_result_without_running_work_when_key_completed(record_of):
    work = Work()

    first = work("k", now=at(0))
    second = work("k", now=at(1))
    third = work("k", now=at(100_000))  # long after any lease: a completed key never runs again

    assert first == ("ran", {"receipt": "r-k", "n": 1})
    assert second == ("replayed", {"receipt": "r-k", "n": 1})
    assert third == ("replayed", {"receipt": "r-k", "n": 1})
    assert work.calls == 1
    assert Receipt.objects.count() == 1
    record = record_of("k")
    assert record.replay_count == 2
    assert record.attempt_count == 1


def test_replay_count_increments_when_each_replay_happens(record_of):
    attempt = claimed("k", now=at(0))
    guard.complete(attempt=attempt, result={"ok": True}, now=at(1))

    counts = []
    for i in range(3):
        outcome = claim("k", now=at(2 + i))
        assert isinstance(outcome, guard.Replay)
        counts.append(outcome.record.replay_count)

    assert counts == [1, 2, 3]
    assert record_of("k").replay_count == 3


def test_claim_returns_inflight_until_lease_end_when_lease_alive(record_of):
    claimed("k", now=at(0))

    outcome = claim("k", now=at(10))

    assert isinstance(outcome, guard.InFlight)
    assert outcome.until == at(LEASE_SECONDS)
    assert outcome.retry_after_seconds(now=at(10)) == LEASE_SECONDS - 10
    assert outcome.retry_after_seconds(now=at(29.5)) == 1  # rounded up, never zero
    assert record_of("k").attempt_count == 1
    assert Attempt.objects.count() == 1


def test_claim_returns_mismatch_when_fingerprint_differs(record_of):
    claimed("k", now=at(0))

    outcome = claim("k", now=at(1), fp=fingerprint({"amount": 6}))

    assert isinstance(outcome, guard.Mismatch)
    assert outcome.record.fingerprint == FP
    assert record_of("k").attempt_count == 1


def test_claim_returns_mismatch_when_operation_differs(record_of):
    claimed("k", now=at(0))

    outcome = claim("k", now=at(1), operation="refund")

    assert isinstance(outcome, guard.Mismatch)
    assert record_of("k").operation == OPERATION


def test_claim_returns_mismatch_not_replay_when_completed_key_reused_for_other_request(record_of):
    attempt = claimed("k", now=at(0))
    guard.complete(attempt=attempt, result={"ok": 1}, now=at(1))

    outcome = claim("k", now=at(2), fp=fingerprint({"amount": 99}))

    assert isinstance(outcome, guard.Mismatch)
    assert record_of("k").replay_count == 0


def test_claim_returns_failed_when_failure_terminal(record_of):
    attempt = claimed("k", now=at(0))
    result = guard.fail(attempt=attempt, error=ValueError("bad input"), policy=RETRYING, now=at(1))
    assert result.terminal

    outcome = claim("k", now=at(10_000))

    assert isinstance(outcome, guard.Failed)
    assert outcome.record.error_summary == "ValueError: bad input"
    assert record_of("k").attempt_count == 1


def test_keys_do_not_collide_when_same_key_used_in_two_scopes():
    claimed("k", now=at(0), scope="client-1")

    outcome = claim("k", now=at(0), scope="client-2")

    assert isinstance(outcome, guard.Claimed)
    assert outcome.attempt.number == 1
    assert IdempotencyRecord.objects.count() == 2


# --- 3. retries, operators' moves, heartbeats, dead letters --------------------------------------


def test_claim_starts_next_numbered_attempt_when_retry_time_passed(record_of, attempt_statuses):
    first = claimed("k", now=at(0))
    failure = guard.fail(attempt=first, error=ConnectionError("reset"), policy=RETRYING, now=at(5))
    assert failure.held and failure.retry_at == at(15)  # 10 s backoff after attempt 1, no jitter

    early = claim("k", now=at(14))
    due = claim("k", now=at(15))

    assert isinstance(early, guard.InFlight) and early.until == at(15)
    assert isinstance(due, guard.Claimed) and due.attempt.number == 2
    record = record_of("k")
    assert (record.status, record.attempt_count, record.retry_at) == (RecordStatus.PROCESSING, 2, None)
    assert record.lease_expires_at == at(15 + LEASE_SECONDS)
    assert attempt_statuses("k") == {1: AttemptStatus.FAILED, 2: AttemptStatus.RUNNING}


def test_fail_records_error_type_message_and_traceback_when_work_raises():
    attempt = claimed("k", now=at(0))
    try:
        raise ConnectionError("upstream reset")
    except ConnectionError as exc:
        guard.fail(attempt=attempt, error=exc, policy=RETRYING, details={"latency_ms": 12}, now=at(3))

    row = Attempt.objects.get(pk=attempt.pk)
    assert row.status == AttemptStatus.FAILED
    assert (row.error_type, row.error_message) == ("ConnectionError", "upstream reset")
    assert 'raise ConnectionError("upstream reset")' in row.traceback
    assert row.finished_at == at(3) and row.details == {"latency_ms": 12}


def test_fail_is_terminal_when_policy_max_attempts_reached(record_of):
    now = 0
    for number in range(1, RETRYING.max_attempts + 1):
        attempt = claimed("k", now=at(now))
        assert attempt.number == number
        outcome = guard.fail(attempt=attempt, error=TimeoutError("slow"), policy=RETRYING, now=at(now + 1))
        now += 1000  # past any backoff
    assert outcome.terminal

    assert isinstance(claim("k", now=at(now)), guard.Failed)
    assert record_of("k").attempt_count == RETRYING.max_attempts


def test_reopen_allows_a_new_attempt_when_failure_terminal(record_of):
    attempt = claimed("k", now=at(0))
    guard.fail(attempt=attempt, error=ValueError("bad"), now=at(1))
    assert isinstance(claim("k", now=at(2)), guard.Failed)

    assert guard.reopen(record=record_of("k"), now=at(3)) is True
    outcome = claim("k", now=at(3))

    assert isinstance(outcome, guard.Claimed) and outcome.attempt.number == 2


def test_reopen_refuses_when_record_not_failed(record_of):
    claimed("k", now=at(0))

    assert guard.reopen(record=record_of("k"), now=at(1)) is False
    assert record_of("k").status == RecordStatus.PROCESSING


def test_release_fences_live_holder_when_operator_releases(record_of, attempt_statuses):
    holder = claimed("k", now=at(0))

    assert guard.release(record=record_of("k"), reason="stuck on a dead host", now=at(5)) is True

    record = record_of("k")
    assert (record.status, record.retry_at, record.lease_expires_at) == (RecordStatus.FAILED, at(5), None)
    assert "stuck on a dead host" in record.error_summary
    assert attempt_statuses("k") == {1: AttemptStatus.TIMED_OUT}
    # The released holder is told to stop, and whatever it still writes is refused.
    assert guard.heartbeat(attempt=holder, now=at(6)) is False
    late = complete_with_receipt(holder, key="k", now=at(7))
    assert late.fenced and late.result is None
    assert Receipt.objects.count() == 0
    assert attempt_statuses("k") == {1: AttemptStatus.FENCED}
    # The retry the operator asked for can start at once.
    retry = claim("k", now=at(5))
    assert isinstance(retry, guard.Claimed) and retry.attempt.number == 2


def test_release_refuses_when_record_not_processing(record_of):
    attempt = claimed("k", now=at(0))
    guard.complete(attempt=attempt, result=1, now=at(1))

    assert guard.release(record=record_of("k"), reason="oops", now=at(2)) is False
    assert record_of("k").status == RecordStatus.COMPLETED


def test_heartbeat_extends_live_lease_when_attempt_holds_key(record_of):
    attempt = claimed("k", now=at(0))
    before = record_of("k").lease_expires_at

    assert guard.heartbeat(attempt=attempt, lease_seconds=60, now=at(20)) is True

    after = record_of("k").lease_expires_at
    assert before == at(LEASE_SECONDS) and after == at(80)
    assert Attempt.objects.get(pk=attempt.pk).heartbeat_at == at(20)
    # Past the original lease, the key is still held thanks to the heartbeat.
    still = claim("k", now=at(LEASE_SECONDS + 1))
    assert isinstance(still, guard.InFlight) and still.until == at(80)


def test_heartbeat_returns_false_and_changes_nothing_when_attempt_superseded(record_of):
    first = claimed("k", now=at(0))
    second = claimed("k", now=at(LEASE_SECONDS + 1))
    lease_of_second = record_of("k").lease_expires_at

    assert guard.heartbeat(attempt=first, lease_seconds=600, now=at(LEASE_SECONDS + 2)) is False

    assert record_of("k").lease_expires_at == lease_of_second
    assert Attempt.objects.get(pk=first.pk).heartbeat_at is None
    assert guard.heartbeat(attempt=second, now=at(LEASE_SECONDS + 2)) is True


def test_expired_attempt_still_completes_when_nobody_superseded_it(record_of):
    attempt = claimed("k", now=at(0))

    assert guard.heartbeat(attempt=attempt, now=at(LEASE_SECONDS + 5)) is True  # late, but nobody took over
    done = complete_with_receipt(attempt, key="k", now=at(LEASE_SECONDS + 100))

    assert not done.fenced
    assert record_of("k").status == RecordStatus.COMPLETED
    assert Receipt.objects.get().attempt_number == 1


def test_claim_dead_letters_key_when_leases_expire_max_attempts_times(record_of, attempt_statuses):
    now = 0
    for number in (1, 2, 3):
        assert claimed("k", now=at(now), max_attempts=3).number == number
        now += LEASE_SECONDS + 1  # the worker died: its lease runs out

    outcome = claim("k", now=at(now), max_attempts=3)

    assert isinstance(outcome, guard.Failed)
    record = record_of("k")
    assert (record.status, record.retry_at, record.attempt_count) == (RecordStatus.FAILED, None, 3)
    assert "gave up" in record.error_summary
    assert attempt_statuses("k") == {n: AttemptStatus.TIMED_OUT for n in (1, 2, 3)}
    assert isinstance(claim("k", now=at(now + 10_000), max_attempts=3), guard.Failed)


def test_fail_writes_only_its_own_row_when_attempt_superseded(record_of, attempt_statuses):
    first = claimed("k", now=at(0))
    claimed("k", now=at(LEASE_SECONDS + 1))
    before = record_of("k")

    outcome = guard.fail(attempt=first, error=TimeoutError("late"), policy=RETRYING, outcome_unknown=True, now=at(40))

    assert (outcome.held, outcome.retry_at, outcome.terminal) == (False, None, False)
    after = record_of("k")
    assert (after.status, after.attempt_count, after.lease_expires_at, after.error_summary) == (
        before.status, before.attempt_count, before.lease_expires_at, before.error_summary,
    )
    assert attempt_statuses("k") == {1: AttemptStatus.UNKNOWN, 2: AttemptStatus.RUNNING}


def test_complete_raises_and_keeps_the_key_when_domain_write_conflicts_while_holding(record_of):
    Receipt.objects.create(key="k", amount=1, attempt_number=0)  # written outside the guard
    attempt = claimed("k", now=at(0))

    with pytest.raises(IntegrityError):
        guard.complete(attempt=attempt, result={"ok": 1}, write=receipt_write("k", attempt), now=at(1))

    record = record_of("k")
    assert (record.status, record.result) == (RecordStatus.PROCESSING, None)
    assert Attempt.objects.get(pk=attempt.pk).status == AttemptStatus.RUNNING
    # The caller can now fail it like any other error.
    assert guard.fail(attempt=attempt, error=ValueError("duplicate receipt"), now=at(2)).terminal


def test_complete_stores_result_and_domain_row_together_when_attempt_holds_key(record_of):
    attempt = claimed("k", now=at(0))

    done = guard.complete(
        attempt=attempt, result={"receipt": 42}, write=receipt_write("k", attempt), details={"tokens": 3}, now=at(3),
    )

    assert (done.fenced, done.result) == (False, {"receipt": 42})
    record = record_of("k")
    assert (record.status, record.result, record.completed_at, record.lease_expires_at) == (
        RecordStatus.COMPLETED, {"receipt": 42}, at(3), None,
    )
    assert record.expires_at == at(3) + timedelta(hours=24)
    row = Attempt.objects.get(pk=attempt.pk)
    assert (row.status, row.finished_at, row.details) == (AttemptStatus.SUCCEEDED, at(3), {"tokens": 3})
    assert Receipt.objects.get().attempt_number == 1


def test_complete_rolls_back_domain_write_when_write_raises(record_of):
    attempt = claimed("k", now=at(0))

    def write():
        Receipt.objects.create(key="k", amount=5, attempt_number=1)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        guard.complete(attempt=attempt, result={"ok": 1}, write=write, now=at(1))

    assert Receipt.objects.count() == 0
    assert record_of("k").status == RecordStatus.PROCESSING


def test_complete_replays_own_result_without_writing_when_winner_completes_again(record_of):
    attempt = claimed("k", now=at(0))
    first = complete_with_receipt(attempt, key="k", now=at(1), result={"receipt": 1})

    again = guard.complete(attempt=attempt, result={"receipt": 2}, write=receipt_write("k", attempt), now=at(2))

    assert not first.fenced
    assert (again.fenced, again.result, again.reason) == (False, {"receipt": 1}, "already completed by this attempt")
    assert Receipt.objects.count() == 1
    assert record_of("k").result == {"receipt": 1}
    assert Attempt.objects.get(pk=attempt.pk).status == AttemptStatus.SUCCEEDED


# --- a record id handed out again ---------------------------------------------------------------


def test_stale_attempt_cannot_move_another_key_when_its_record_id_is_reused(record_of):
    """A claim committed asynchronously (the DRF layer skips the claim's own WAL flush) can be
    lost in a database crash, and its record id handed to a new key. The old attempt still
    carries that id and number 1: it must be refused, not complete, fail or extend the new key."""
    stale = claimed("lost", now=at(0))
    reused_id = stale.record_id
    IdempotencyRecord.objects.filter(pk=reused_id).delete()  # the crash lost the claim (and its attempt)
    IdempotencyRecord.objects.create(
        pk=reused_id, scope="test", key="other", operation=OPERATION, fingerprint=FP,
        status=RecordStatus.PROCESSING, attempt_count=1, lease_expires_at=at(30), expires_at=at(3600),
    )
    newcomer = Attempt.objects.create(record_id=reused_id, number=1, worker="host-b:2", started_at=at(1))

    assert guard.heartbeat(attempt=stale, now=at(2)) is False
    assert guard.fail(attempt=stale, error=TimeoutError("late"), policy=RETRYING, now=at(3)).held is False
    done = complete_with_receipt(stale, key="lost", now=at(4))

    assert done.fenced
    assert not Receipt.objects.filter(key="lost").exists()
    other = record_of("other")
    assert (other.status, other.attempt_count, other.lease_expires_at) == (RecordStatus.PROCESSING, 1, at(30))
    assert guard.complete(attempt=newcomer, result={"ok": True}, now=at(5)).fenced is False


# --- on_claimed: the caller's bookkeeping commits with the claim ------------------------------------


class Refused(Exception):
    pass


def test_on_claimed_commits_with_the_claim_when_it_succeeds(record_of):
    outcome = guard.claim(
        scope="test", key="k", operation=OPERATION, fingerprint=FP, lease_seconds=LEASE_SECONDS, now=at(0),
        on_claimed=lambda attempt: Receipt.objects.create(key="started-k", amount=0, attempt_number=attempt.number),
    )

    assert isinstance(outcome, guard.Claimed)
    assert Receipt.objects.get(key="started-k").attempt_number == 1
    assert record_of("k").attempt_count == 1


def test_on_claimed_rolls_the_claim_back_when_it_raises_on_a_new_key():
    def refuse(attempt):
        Receipt.objects.create(key="started-k", amount=0, attempt_number=attempt.number)
        raise Refused

    with pytest.raises(Refused):
        guard.claim(scope="test", key="k", operation=OPERATION, fingerprint=FP, now=at(0), on_claimed=refuse)

    assert not IdempotencyRecord.objects.filter(key="k").exists()
    assert not Attempt.objects.exists()
    assert not Receipt.objects.exists()
    assert isinstance(claim("k", now=at(1)), guard.Claimed)  # the key is free


def test_on_claimed_rolls_a_takeover_back_when_it_raises(record_of, attempt_statuses):
    claimed("k", now=at(0))  # attempt #1, lease until at(30)

    with pytest.raises(Refused):
        guard.claim(
            scope="test", key="k", operation=OPERATION, fingerprint=FP, lease_seconds=LEASE_SECONDS, now=at(60),
            on_claimed=lambda attempt: (_ for _ in ()).throw(Refused()),
        )

    record = record_of("k")
    assert (record.status, record.attempt_count, record.lease_expires_at) == (RecordStatus.PROCESSING, 1, at(LEASE_SECONDS))
    assert attempt_statuses("k") == {1: AttemptStatus.RUNNING}


def test_complete_is_fenced_and_writes_nothing_when_the_record_was_purged_under_it():
    attempt = claimed("purged", now=at(0))
    IdempotencyRecord.objects.filter(key="purged").delete()  # the purge, or an operator, under a live attempt

    done = guard.complete(attempt=attempt, result={"late": True}, write=receipt_write("purged", attempt), now=at(1))

    assert done.fenced and done.result is None and "deleted" in done.reason
    assert not Receipt.objects.exists()  # the write was rolled back
    assert not IdempotencyRecord.objects.exists()  # and nothing re-created the key
