"""Running one step's callable for a claimed attempt: outside any transaction, under a heartbeat.

The heartbeat extends the attempt's lease every third of it. If the guard refuses (a newer
attempt took the key, or an operator released it), it sets the step's stop event: a cooperative
step checks ``ctx.raise_if_stopped()``, and whatever it returns is fenced at completion anyway.

One beater thread per worker process keeps the leases of all the process's running attempts: a
step registers when it starts and leaves when its completion or failure has committed. A thread
and a database connection per step (started, joined and closed around every step, even the ones
that end long before their first beat is due) cost a no-op step a fifth of its time. The beater
connects only when a beat is due and closes its connection whenever no attempt is left, so a
worker running short steps never opens one, and no connection outlives the work it served.
"""
from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from typing import Any

from django.db import connection

from idempotency import guard
from idempotency.models import Attempt

from .steps import Step, StepContext

log = logging.getLogger(__name__)


class Heartbeat:
    """Extends ``attempt``'s lease every ``lease_seconds / 3`` while the block runs (through the
    process's beater); sets ``stop_event`` once the guard refuses a beat."""

    def __init__(self, *, attempt: Attempt, lease_seconds: float, stop_event: threading.Event):
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self.interval = max(0.05, lease_seconds / 3)
        self.fenced = stop_event
        self.beats = 0
        self.due = 0.0  # monotonic time of the next beat, set on registration
        # The beat runs in a copy of the caller's context, so its log lines carry the input, step and attempt.
        self.context = contextvars.copy_context()

    def beat(self) -> None:
        """One beat, on the beater's thread and connection."""
        try:
            held = guard.heartbeat(attempt=self.attempt, lease_seconds=self.lease_seconds)
        except Exception:  # a database hiccup: keep the step going, try again next beat
            log.warning("heartbeat of attempt %s failed", self.attempt.pk, exc_info=True)
            connection.close()  # a broken connection is not reused: the next beat opens a new one
            return
        self.beats += 1
        if not held:
            self.fenced.set()

    def __enter__(self) -> "Heartbeat":
        _beater().add(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _beater().remove(self)


class _Beater:
    """The process's heartbeat thread: beats each registered attempt when it is due."""

    def __init__(self) -> None:
        self._live: dict[int, Heartbeat] = {}
        self._changed = threading.Condition()
        self._beating: Heartbeat | None = None
        self._thread = threading.Thread(target=self._run, name="step-heartbeats", daemon=True)
        self._thread.start()

    def add(self, heartbeat: Heartbeat) -> None:
        with self._changed:
            heartbeat.due = time.monotonic() + heartbeat.interval
            self._live[id(heartbeat)] = heartbeat
            self._changed.notify()

    def remove(self, heartbeat: Heartbeat) -> None:
        with self._changed:
            self._live.pop(id(heartbeat), None)
            # A beat of this attempt in progress finishes first: none runs after the step is done.
            while self._beating is heartbeat:
                self._changed.wait()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if not self._live:
                        connection.close()  # nothing to keep alive: hold no connection meanwhile
                        self._changed.wait()
                        continue
                    heartbeat = min(self._live.values(), key=lambda h: h.due)
                    wait = heartbeat.due - time.monotonic()
                    if wait <= 0:
                        break
                    self._changed.wait(wait)
                heartbeat.due = time.monotonic() + heartbeat.interval
                self._beating = heartbeat
            try:
                heartbeat.context.run(heartbeat.beat)
            finally:
                with self._changed:
                    self._beating = None
                    self._changed.notify_all()


_BEATERS: dict[int, _Beater] = {}
_BEATERS_LOCK = threading.Lock()


def _beater() -> _Beater:
    """This process's beater (a forked worker starts its own: threads do not survive a fork)."""
    pid = os.getpid()
    beater = _BEATERS.get(pid)
    if beater is None:
        with _BEATERS_LOCK:
            beater = _BEATERS.get(pid)
            if beater is None:
                beater = _BEATERS[pid] = _Beater()
    return beater


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
