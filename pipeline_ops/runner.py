"""Running one step's callable for a claimed attempt: outside any transaction, under a heartbeat.

The heartbeat is a thread that extends the attempt's lease every third of it. If the guard
refuses (a newer attempt took the key, or an operator released it), it sets the step's stop
event: a cooperative step checks ``ctx.raise_if_stopped()``, and whatever it returns is fenced
at completion anyway. The thread uses its own database connection and closes it when done.
"""
from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

from django.db import connection

from idempotency import guard
from idempotency.models import Attempt

from .steps import Step, StepContext

log = logging.getLogger(__name__)


class Heartbeat:
    """Extends ``attempt``'s lease every ``lease_seconds / 3`` while the step runs."""

    def __init__(self, *, attempt: Attempt, lease_seconds: float, stop_event: threading.Event):
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self.interval = max(0.05, lease_seconds / 3)
        self.fenced = stop_event
        self.beats = 0
        self._done = threading.Event()
        # In a copy of the caller's context, so its log lines carry the input, step and attempt.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name=f"heartbeat:{attempt.pk}", daemon=True
        )

    def _run(self) -> None:
        try:
            while not self._done.wait(self.interval):
                try:
                    held = guard.heartbeat(attempt=self.attempt, lease_seconds=self.lease_seconds)
                except Exception:  # a database hiccup: keep the step going, try again next beat
                    log.warning("heartbeat of attempt %s failed", self.attempt.pk, exc_info=True)
                    continue
                self.beats += 1
                if not held:
                    self.fenced.set()
                    return
        finally:
            connection.close()  # this thread's own connection

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join(timeout=max(5.0, self.interval))


def attempt_heartbeat(*, step: Step, ctx: StepContext, attempt: Attempt) -> Heartbeat:
    """The heartbeat that keeps ``attempt``'s lease while its step runs *and* while its result is
    being committed: a completion retried through a database restart must not lose its key to a
    takeover in the meantime."""
    return Heartbeat(attempt=attempt, lease_seconds=step.lease_seconds, stop_event=ctx.stop_event)


def step_call(*, step: Step, ctx: StepContext) -> dict:
    """Run ``step``; returns its output or raises its error.

    Must be called outside any transaction (and inside ``attempt_heartbeat``): on SQLite a
    transaction held across a model call would block every other writer for as long as the
    model takes.
    """
    output = step.func(ctx)
    if not isinstance(output, dict):
        raise TypeError(f"step {step.name!r} returned {type(output).__name__}, not a dict")
    return output
