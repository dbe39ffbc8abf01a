"""Shared helpers for the guard's tests: a fixed clock, a retry policy, the domain write.

Every guard call in these tests passes an explicit ``now=``: time is data here, never a sleep.
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from idempotency import guard
from idempotency.fingerprint import fingerprint
from idempotency.policy import RetryPolicy
from tests.testapp.models import Receipt

BASE = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
LEASE_SECONDS = 30
SCOPE = "test"
OPERATION = "charge"
FP = fingerprint({"amount": 5})


def at(seconds: float) -> datetime:
    """The fake clock: ``seconds`` after BASE."""
    return BASE + timedelta(seconds=seconds)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, (TimeoutError, ConnectionError))


# No jitter, so retry times are exact: attempt n waits 10 * 2**(n-1) seconds, capped at 60.
RETRYING = RetryPolicy(
    max_attempts=5, backoff_base_seconds=10, backoff_max_seconds=60, jitter=False, is_transient=is_transient
)


def claim(key: str = "k", *, now, fp: str = FP, operation: str = OPERATION, lease: float = LEASE_SECONDS,
          max_attempts: int | None = None, scope: str = SCOPE, worker: str | None = None):
    return guard.claim(
        scope=scope, key=key, operation=operation, fingerprint=fp, lease_seconds=lease,
        max_attempts=max_attempts, worker=worker, now=now,
    )


def claimed(key: str = "k", **kwargs):
    """Claim and insist it was Claimed; returns the Attempt."""
    outcome = claim(key, **kwargs)
    assert isinstance(outcome, guard.Claimed), outcome
    return outcome.attempt


def receipt_write(key: str, attempt, *, amount: int = 5):
    """The domain write: one Receipt per key (unique), stamped with the attempt that wrote it."""
    return lambda: Receipt.objects.create(key=key, amount=amount, attempt_number=attempt.number)


def complete_with_receipt(attempt, *, key: str = "k", now, result=None):
    result = {"receipt_for": key, "by": attempt.number} if result is None else result
    return guard.complete(attempt=attempt, result=result, write=receipt_write(key, attempt), now=now)
