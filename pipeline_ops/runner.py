"""Running one step's callable for a claimed attempt: outside any transaction, under a heartbeat.

The heartbeat (``idempotency.heartbeat``: one beater thread per process for all its running
attempts, connecting only when a beat is due) extends the attempt's lease every third of it. If
the guard refuses (a newer attempt took the key, or an operator released it), it sets the step's
stop event: a cooperative step checks ``ctx.raise_if_stopped()``, and whatever it returns is
fenced at completion anyway.
"""
from __future__ import annotations

import logging

from idempotency.heartbeat import Heartbeat
from idempotency.models import Attempt

from .steps import Step, StepContext

log = logging.getLogger(__name__)


def attempt_heartbeat(*, step: Step, ctx: StepContext, attempt: Attempt) -> Heartbeat:
    """The heartbeat that keeps ``attempt``'s lease while its step runs *and* while its result is
    being committed: a completion retried through a database restart must not lose its key to a
    takeover in the meantime."""
    # No liveness lock for steps: a step's take-over after a crash is the lease's and the
    # reconciler's (a lock per step would cost every step a statement on the liveness session).
    return Heartbeat(attempt=attempt, lease_seconds=step.lease_seconds, stop_event=ctx.stop_event, liveness=False)


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
