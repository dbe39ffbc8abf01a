"""Retry policy: how many attempts, how long to back off, and which errors deserve a retry."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .faults import is_infrastructure_error


def _never_transient(exc: BaseException) -> bool:
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Decides, after a failed attempt, between a retry at a later time and a terminal failure.

    ``is_transient`` classifies an error: transient errors (timeouts, connection errors, 429,
    5xx) are retried with exponential backoff and full jitter until ``max_attempts`` attempts
    were made; anything else fails at once. An error with a ``retry_after_seconds`` attribute
    (a 429's ``Retry-After``) waits at least that long.
    """

    max_attempts: int = 1
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    jitter: bool = True
    is_transient: Callable[[BaseException], bool] = field(default=_never_transient)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff_seconds(self, attempt_number: int, *, rng: random.Random | None = None) -> float:
        """Delay before attempt ``attempt_number + 1``: base * 2**(n-1), capped, with full jitter."""
        ceiling = min(self.backoff_max_seconds, self.backoff_base_seconds * (2 ** max(0, attempt_number - 1)))
        if not self.jitter:
            return ceiling
        # "Equal jitter": at least half the ceiling, so retries never bunch at zero.
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)

    def retry_delay(self, *, attempt_number: int, error: BaseException | None) -> float | None:
        """Seconds to wait before the next attempt, or None when there must be no retry.

        An infrastructure error (``idempotency.faults``: the database connection lost, a
        deadlock, a lock timeout) is the platform's failure, not the work's: it is always
        retried with backoff, whatever ``is_transient`` and ``max_attempts`` say, so that a
        database restart can never make work terminal.
        """
        if error is not None and is_infrastructure_error(error):
            return self.backoff_seconds(attempt_number)
        if error is not None and not self.is_transient(error):
            return None
        if attempt_number >= self.max_attempts:
            return None
        delay = self.backoff_seconds(attempt_number)
        hinted = getattr(error, "retry_after_seconds", None)
        if hinted is not None:
            delay = max(delay, float(hinted))
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)
