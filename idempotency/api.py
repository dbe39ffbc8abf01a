"""The public API for any Django code: run a block of work at most once in effect per key.

    from idempotency.api import idempotent

    with idempotent(scope="invoices", key=f"invoice:{order.pk}", operation="send_invoice",
                    request={"order": order.pk, "amount": order.amount}) as run:
        if run.replayed:
            return run.result                       # done before: nothing runs again
        receipt = mailer.send(order)                # slow work, outside any transaction
        run.complete({"receipt": receipt.id},       # stored for replays...
                     write=lambda: Invoice.objects.create(order=order, receipt=receipt.id))
                                                    # ...committed with the domain write, or neither
    if run.fenced:                                  # a newer attempt won; our write was rolled back
        log.info("late attempt discarded, winner stored %s", run.result)

``__enter__`` raises ``KeyInProgressError`` (another attempt holds the key),
``KeyReusedError`` (same key, other request) or ``KeyFailedError`` (failed for good). An
exception inside the block fails the attempt through the retry policy and propagates.

While the block runs, a heartbeat thread (``idempotency.heartbeat``) extends the lease every
third of it and, on PostgreSQL, holds the attempt's liveness lock until the block's completion or
failure has committed, so a block longer than its lease keeps its key and a process that died in
it is taken over at once. ``run.stop_event`` is set once the key was taken away (cooperative
work may check it; its completion would be fenced anyway).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import guard
from .errors import AttemptFencedError, KeyFailedError, KeyInProgressError, KeyReusedError
from .fingerprint import fingerprint as fingerprint_of
from .heartbeat import Heartbeat
from .models import Attempt
from .policy import NO_RETRY, RetryPolicy


class GuardedRun:
    """The handle a guarded block works with."""

    def __init__(self, *, attempt: Attempt | None, replayed: bool, result: Any = None):
        self.attempt = attempt
        self.replayed = replayed
        self.result = result
        self.fenced = False
        self.finished = replayed
        # Set by the heartbeat once a newer attempt (or an operator) took the key away.
        self.stop_event = threading.Event()

    def heartbeat(self, *, lease_seconds: float | None = None) -> None:
        """Extend the lease; raises ``AttemptFencedError`` if a newer attempt took the key."""
        if self.attempt is None or not guard.heartbeat(attempt=self.attempt, lease_seconds=lease_seconds):
            raise AttemptFencedError()

    def complete(self, result: Any, *, write: Callable[[], Any] | None = None, details: dict | None = None) -> Any:
        """Store ``result`` and run ``write`` in the same transaction; returns the kept result."""
        if self.attempt is None or self.finished:
            raise RuntimeError("this run holds no attempt to complete")
        completion = guard.complete(attempt=self.attempt, result=result, write=write, details=details)
        self.finished = True
        self.fenced = completion.fenced
        self.result = completion.result
        return self.result


class idempotent:  # noqa: N801 - reads as a statement: ``with idempotent(...)``
    """Context manager around a block of work guarded by ``(scope, key)``; see the module doc."""

    def __init__(
        self,
        *,
        scope: str,
        key: str,
        operation: str,
        request: Any = None,
        fingerprint: str | None = None,
        lease_seconds: float | None = None,
        policy: RetryPolicy = NO_RETRY,
        max_attempts: int | None = None,
    ):
        self.scope, self.key, self.operation = scope, key, operation
        self.fingerprint = fingerprint or fingerprint_of(request)
        self.lease_seconds = lease_seconds
        self.policy = policy
        self.max_attempts = max_attempts or policy.max_attempts
        self.run: GuardedRun | None = None
        self._heartbeat: Heartbeat | None = None

    def __enter__(self) -> GuardedRun:
        outcome = guard.claim(
            scope=self.scope, key=self.key, operation=self.operation, fingerprint=self.fingerprint,
            lease_seconds=self.lease_seconds, max_attempts=self.max_attempts,
        )
        match outcome:
            case guard.Claimed(attempt=attempt):
                self.run = GuardedRun(attempt=attempt, replayed=False)
                self._heartbeat = Heartbeat(attempt=attempt, lease_seconds=self.lease_seconds, stop_event=self.run.stop_event)
                self._heartbeat.__enter__()
            case guard.Replay():
                self.run = GuardedRun(attempt=None, replayed=True, result=outcome.result)
            case guard.InFlight():
                raise KeyInProgressError(until=outcome.until, retry_after=outcome.retry_after_seconds())
            case guard.Mismatch():
                raise KeyReusedError()
            case guard.Failed(record=record):
                raise KeyFailedError(detail={"error": record.error_summary})
        return self.run

    def __exit__(self, exc_type, exc, tb) -> bool:
        # The heartbeat stops only after the attempt's ending committed (the completion inside
        # the block, or the failure below): until then the liveness lock says "alive".
        try:
            return self._end(exc)
        finally:
            if self._heartbeat is not None:
                self._heartbeat.__exit__(exc_type, exc, tb)
                self._heartbeat = None

    def _end(self, exc: BaseException | None) -> bool:
        run = self.run
        if run is None or run.finished or run.attempt is None:
            return False
        if exc is None:
            exc = RuntimeError("the guarded block ended without calling complete()")
            guard.fail(attempt=run.attempt, error=exc, policy=NO_RETRY)
            raise exc
        guard.fail(attempt=run.attempt, error=exc, policy=self.policy)
        return False
