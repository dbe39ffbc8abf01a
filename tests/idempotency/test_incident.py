"""The incident that motivated the guard, replayed through a real domain model.

A model call times out although the provider received it; the step is retried, the retry saves the
result; then the first call finishes late and tries to save it again. The seed system's first fix
then blocked legitimate third deliveries. Here, on SQLite and PostgreSQL with real commits
(``transaction=True``):

* the late write is rolled back, the late attempt is FENCED and gets the winner's result;
* exactly one domain row exists;
* a third delivery replays the stored result: it neither runs nor errors.

These tests use only ``tests.testapp.Receipt``, a model that knows nothing of pipelines: they are
the proof that the idempotency app works on its own, with any project's domain model.
"""
from __future__ import annotations

import pytest

from idempotency import guard
from idempotency.models import Attempt
from idempotency.states import AttemptStatus, RecordStatus
from tests.testapp.models import Receipt

from .helpers import LEASE_SECONDS, RETRYING, at, claim, claimed, complete_with_receipt

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "order-7:charge"


def test_late_attempt_is_fenced_and_third_delivery_replays_when_timed_out_call_finishes_late(record_of, attempt_statuses):
    # Attempt 1 claims and calls the provider; the call times out (it may have happened).
    first = claimed(KEY, now=at(0))
    failure = guard.fail(
        attempt=first, error=TimeoutError("provider did not answer in 30 s"), policy=RETRYING,
        outcome_unknown=True, now=at(30),
    )
    assert failure.held and failure.retry_at == at(40)
    assert attempt_statuses(KEY) == {1: AttemptStatus.UNKNOWN}
    assert isinstance(claim(KEY, now=at(39)), guard.InFlight)  # the retry is not due yet

    # Attempt 2 claims once the retry is due and completes with the domain write.
    second = claimed(KEY, now=at(40))
    assert second.number == 2
    won = complete_with_receipt(second, key=KEY, now=at(45), result={"receipt": "r-2"})
    assert (won.fenced, won.result) == (False, {"receipt": "r-2"})

    # Attempt 1's call returns at last and it tries to save its result too.
    late = complete_with_receipt(first, key=KEY, now=at(50), result={"receipt": "r-1"})

    assert late.fenced is True
    assert late.result == {"receipt": "r-2"}  # the winner's result, not its own
    assert Receipt.objects.count() == 1
    assert Receipt.objects.get().attempt_number == 2
    assert attempt_statuses(KEY) == {1: AttemptStatus.FENCED, 2: AttemptStatus.SUCCEEDED}
    assert Attempt.objects.get(pk=first.pk).error_type == "Fenced"
    record = record_of(KEY)
    assert (record.status, record.result, record.attempt_count) == (RecordStatus.COMPLETED, {"receipt": "r-2"}, 2)

    # The seed system blocked this third delivery; here it is answered from the stored result.
    third = claim(KEY, now=at(3600))
    assert isinstance(third, guard.Replay)
    assert third.result == {"receipt": "r-2"}
    assert record_of(KEY).attempt_count == 2
    assert Attempt.objects.count() == 2
    assert Receipt.objects.count() == 1


def test_late_attempt_is_fenced_when_its_lease_expired_and_a_newer_attempt_took_over(record_of, attempt_statuses):
    # Attempt 1 stalls without ever calling fail: only its lease says it is gone.
    first = claimed(KEY, now=at(0))
    assert isinstance(claim(KEY, now=at(LEASE_SECONDS - 1)), guard.InFlight)

    second = claimed(KEY, now=at(LEASE_SECONDS + 1))
    assert second.number == 2
    assert attempt_statuses(KEY) == {1: AttemptStatus.TIMED_OUT, 2: AttemptStatus.RUNNING}
    assert guard.heartbeat(attempt=first, now=at(LEASE_SECONDS + 2)) is False  # told to stop

    won = complete_with_receipt(second, key=KEY, now=at(LEASE_SECONDS + 5), result={"receipt": "r-2"})
    late = complete_with_receipt(first, key=KEY, now=at(LEASE_SECONDS + 9), result={"receipt": "r-1"})

    assert not won.fenced
    assert late.fenced and late.result == {"receipt": "r-2"}
    assert Receipt.objects.count() == 1 and Receipt.objects.get().attempt_number == 2
    assert attempt_statuses(KEY) == {1: AttemptStatus.FENCED, 2: AttemptStatus.SUCCEEDED}
    assert isinstance(claim(KEY, now=at(3600)), guard.Replay)


def test_late_attempt_is_fenced_before_winner_completes_when_newer_attempt_holds_key(record_of, attempt_statuses):
    """The late attempt finishes while attempt 2 is still running: its write is refused, the key stays
    with attempt 2 (no result yet), and attempt 2 completes normally afterwards."""
    first = claimed(KEY, now=at(0))
    guard.fail(attempt=first, error=TimeoutError("slow"), policy=RETRYING, outcome_unknown=True, now=at(30))
    second = claimed(KEY, now=at(40))

    late = complete_with_receipt(first, key=KEY, now=at(41))

    assert late.fenced and late.result is None
    assert Receipt.objects.count() == 0
    record = record_of(KEY)
    assert (record.status, record.attempt_count) == (RecordStatus.PROCESSING, 2)
    assert not complete_with_receipt(second, key=KEY, now=at(42)).fenced
    assert Receipt.objects.get().attempt_number == 2
