"""What a step is: a plain callable with a declared policy, the context it runs in, and its errors.

A step receives a ``StepContext`` (the input's payload and the outputs of earlier steps) and
returns a JSON-serialisable dict, its output. It raises ``TransientStepError`` for failures that
deserve a retry, ``PermanentStepError`` for those that never will, and ``OutcomeUnknownError``
when an external call timed out and may have happened (the incident). Plain exceptions of the
HTTP client are classified too (``is_transient`` / ``is_outcome_unknown``), so a step may let
them propagate.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from idempotency.policy import RetryPolicy


class StepError(Exception):
    """Base of the errors a step raises on purpose."""


class TransientStepError(StepError):
    """Worth a retry (5xx, 429, connection trouble). ``retry_after_seconds``: the provider's hint."""

    def __init__(self, message: str, *, retry_after_seconds: float | None = None):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class OutcomeUnknownError(TransientStepError):
    """The external call timed out after the request was sent: it may have happened.

    Retried like any transient error; the attempt ends as UNKNOWN, not FAILED, and the retry is
    safe only because the provider sees the same Idempotency-Key."""


class PermanentStepError(StepError):
    """Never worth a retry (bad input, a 4xx other than 429, a misconfiguration)."""


class StepStoppedError(StepError):
    """The attempt lost its key (a heartbeat was refused): the step stopped cooperatively."""


def is_outcome_unknown(exc: BaseException) -> bool:
    """A timeout after the request left: the provider may have done the work."""
    if isinstance(exc, OutcomeUnknownError):
        return True
    # ConnectTimeout and PoolTimeout fire before any byte is sent: nothing can have happened.
    return isinstance(exc, httpx.TimeoutException) and not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout))


def is_transient(exc: BaseException) -> bool:
    """Timeouts, connection errors, 429 and 5xx are transient; everything else is permanent."""
    if isinstance(exc, TransientStepError):
        return True
    if isinstance(exc, PermanentStepError):
        return False
    # httpx.TransportError covers timeouts, connect/read/write errors and protocol errors.
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


@dataclass
class StepContext:
    """Everything a step may read, and the ``details`` it may report (latency, tokens…)."""

    step: str
    step_run_id: int
    input_id: str
    idempotency_key: str
    attempt_number: int
    payload: Any
    outputs: dict[str, Any]
    timeout_seconds: float | None = None  # the step's budget for external calls (None: its own default)
    details: dict[str, Any] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)

    @property
    def stop_requested(self) -> bool:
        return self.stop_event.is_set()

    def raise_if_stopped(self) -> None:
        """Long steps call this between chunks of work: a fenced attempt must not keep going."""
        if self.stop_event.is_set():
            raise StepStoppedError("this attempt lost its key to a newer one; stopping")

    def text(self) -> str:
        """The cleaned text when ``preprocess`` ran, else the payload's ``text``."""
        cleaned = self.outputs.get("preprocess")
        if isinstance(cleaned, dict) and isinstance(cleaned.get("text"), str):
            return cleaned["text"]
        if isinstance(self.payload, dict) and isinstance(self.payload.get("text"), str):
            return self.payload["text"]
        raise PermanentStepError("the payload has no 'text' string")


StepCallable = Callable[[StepContext], dict]


@dataclass(frozen=True)
class Step:
    """A named callable and how to run it.

    ``lease_seconds``: how long a claim holds the step's key before another attempt may take
    over; the runner heartbeats every third of it, so a step may run longer than its lease as
    long as its worker is alive. ``timeout_seconds``: the step's own budget for external calls
    (``ctx.timeout_seconds``; the llm step's read timeout, ``LLM_TIMEOUT_SECONDS`` when None);
    keep it below django-q2's ``timeout``.
    """

    name: str
    func: StepCallable
    policy: RetryPolicy
    lease_seconds: float = 30.0
    timeout_seconds: float | None = None
    description: str = ""

    def is_transient(self, exc: BaseException) -> bool:
        return self.policy.is_transient(exc)

    def is_outcome_unknown(self, exc: BaseException) -> bool:
        return is_outcome_unknown(exc)
