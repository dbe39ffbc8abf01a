"""The public ``idempotent`` context manager (idempotency/api.py), with the Receipt domain model."""
from __future__ import annotations

import pytest

from idempotency import guard
from idempotency.api import idempotent
from idempotency.errors import AttemptFencedError, KeyFailedError, KeyInProgressError, KeyReusedError
from idempotency.fingerprint import fingerprint
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from tests.testapp.models import Receipt

from .helpers import RETRYING

pytestmark = pytest.mark.django_db

REQUEST = {"order": 7, "amount": 5}


def charge(key: str, calls: list, *, request=REQUEST, policy=None):
    """A caller using the API the way the docs show; ``calls`` counts real runs of the work."""
    kwargs = {"policy": policy} if policy else {}
    with idempotent(scope="payments", key=key, operation="charge", request=request, **kwargs) as run:
        if run.replayed:
            return run.result
        calls.append(key)
        run.complete(
            {"receipt": f"r-{key}"},
            write=lambda: Receipt.objects.create(key=key, amount=request["amount"], attempt_number=run.attempt.number),
        )
    return run.result


def test_block_runs_once_and_replays_when_same_request_repeats():
    calls = []

    first = charge("k1", calls)
    second = charge("k1", calls)

    assert first == second == {"receipt": "r-k1"}
    assert calls == ["k1"]
    assert Receipt.objects.count() == 1
    record = IdempotencyRecord.objects.get(scope="payments", key="k1")
    assert (record.status, record.replay_count, record.fingerprint) == (RecordStatus.COMPLETED, 1, fingerprint(REQUEST))


def test_exception_fails_attempt_and_propagates_when_block_raises():
    with pytest.raises(ValueError, match="card declined"):
        with idempotent(scope="payments", key="k2", operation="charge", request=REQUEST) as run:
            raise ValueError("card declined")

    attempt = Attempt.objects.get(pk=run.attempt.pk)
    assert (attempt.status, attempt.error_type, attempt.error_message) == (AttemptStatus.FAILED, "ValueError", "card declined")
    record = IdempotencyRecord.objects.get(key="k2")
    assert (record.status, record.retry_at) == (RecordStatus.FAILED, None)  # default policy: no retry
    with pytest.raises(KeyFailedError) as failed:
        charge("k2", [])
    assert failed.value.detail == {"error": "ValueError: card declined"}
    assert (failed.value.status_code, failed.value.code) == (409, "idempotency_key_failed")


def test_transient_exception_schedules_retry_when_policy_allows_it():
    with pytest.raises(TimeoutError):
        with idempotent(scope="payments", key="k3", operation="charge", request=REQUEST, policy=RETRYING):
            raise TimeoutError("provider slow")

    record = IdempotencyRecord.objects.get(key="k3")
    assert record.status == RecordStatus.FAILED and record.retry_at is not None
    with pytest.raises(KeyInProgressError):  # the retry is not due for another ~10 s
        charge("k3", [], policy=RETRYING)


def test_block_without_complete_fails_the_attempt_when_it_returns_normally():
    with pytest.raises(RuntimeError, match="without calling complete"):
        with idempotent(scope="payments", key="k4", operation="charge", request=REQUEST) as run:
            pass

    assert Attempt.objects.get(pk=run.attempt.pk).status == AttemptStatus.FAILED


def test_run_reports_fenced_and_keeps_no_write_when_operator_released_the_key():
    with idempotent(scope="payments", key="k5", operation="charge", request=REQUEST) as run:
        # While the work runs, an operator releases the key (a forced retry): this run no longer holds it.
        guard.release(record=run.attempt.record, reason="forced retry")
        with pytest.raises(AttemptFencedError):
            run.heartbeat()
        kept = run.complete({"receipt": "late"}, write=lambda: Receipt.objects.create(key="k5", amount=5, attempt_number=1))

    assert run.fenced is True
    assert kept is None and run.result is None
    assert Receipt.objects.count() == 0
    assert Attempt.objects.get(pk=run.attempt.pk).status == AttemptStatus.FENCED


def test_heartbeat_extends_lease_when_run_holds_the_key():
    with idempotent(scope="payments", key="k6", operation="charge", request=REQUEST, lease_seconds=5) as run:
        before = IdempotencyRecord.objects.get(key="k6").lease_expires_at
        run.heartbeat(lease_seconds=600)
        after = IdempotencyRecord.objects.get(key="k6").lease_expires_at
        run.complete({"ok": True})

    assert (after - before).total_seconds() > 500


def test_enter_raises_key_in_progress_with_retry_after_when_another_attempt_holds_the_key():
    guard.claim(scope="payments", key="k7", operation="charge", fingerprint=fingerprint(REQUEST), lease_seconds=60)
    calls = []

    with pytest.raises(KeyInProgressError) as busy:
        charge("k7", calls)

    assert calls == []
    assert (busy.value.status_code, busy.value.code) == (409, "idempotency_key_in_progress")
    assert 1 <= busy.value.retry_after <= 60
    assert busy.value.until == IdempotencyRecord.objects.get(key="k7").lease_expires_at


def test_enter_raises_key_reused_when_request_body_differs():
    charge("k8", [])
    calls = []

    with pytest.raises(KeyReusedError) as reused:
        charge("k8", calls, request={"order": 7, "amount": 500})

    assert calls == []
    assert (reused.value.status_code, reused.value.code) == (422, "idempotency_key_reused")


def test_complete_twice_is_refused_when_run_already_finished():
    with idempotent(scope="payments", key="k9", operation="charge", request=REQUEST) as run:
        run.complete({"ok": 1})
        with pytest.raises(RuntimeError, match="no attempt to complete"):
            run.complete({"ok": 2})

    assert IdempotencyRecord.objects.get(key="k9").result == {"ok": 1}
