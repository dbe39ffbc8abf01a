"""The heartbeat of a running attempt: its lease kept, and (on PostgreSQL) its liveness lock held,
for as long as the attempt runs.

    stop = threading.Event()
    with Heartbeat(attempt=attempt, lease_seconds=30, stop_event=stop):
        result = do_the_slow_work(stop)               # cooperative work may check stop.is_set()
        guard.complete(attempt=attempt, result=result)  # inside: the lock outlives the commit

**The liveness lock** is taken on entry, before the work runs, in the process's one liveness
session (``idempotency.liveness.LivenessSession``: one connection per process, shared by all its
live attempts; one statement), and given back on exit (one ``pg_advisory_unlock``), so the
``with`` block must span the completion or the failure: their commit first, then the lock goes.
A request no longer opens a connection of its own (that cost as much as the request itself).

**The beats.** Every ``lease_seconds / 3`` the attempt's lease is extended (``guard.heartbeat``)
by the process's **one heartbeat thread**, which beats every live attempt whose beat is due, on
its own database connection. Nothing is started per attempt: an attempt that ends before its
first beat is due (most API requests take milliseconds) costs a dict entry, and the thread opens
its connection only when a beat is due (and closes it once no attempt is live). The same thread
checks the liveness session (``LivenessSession.check``) while attempts hold locks on it.

If the guard refuses a beat (a newer attempt took the key, an operator released it, the key
completed or failed), the attempt is fenced: its ``stop_event`` is set, it is beaten no more, and
its lock is given back at once (its key's fate is no longer its own); whatever the work still
does is refused at completion anyway. A database error in a beat is logged and the beat is tried
again at the next interval: it is never raised into the work (a blip must not fail a request).

The thread is created lazily in each process, so a forked child (gunicorn ``--preload``) starts
its own; the liveness session is never shared with a child either.
"""
from __future__ import annotations

import contextvars
import logging
import math
import os
import threading
import time
from typing import Any

from django.db import connections, router

from . import guard, liveness
from .conf import get as conf_get
from .models import Attempt

log = logging.getLogger(__name__)

# The longest the heartbeat thread sleeps with nothing to do but wait for a new attempt.
_IDLE_WAIT_SECONDS = 60.0


class Heartbeat:
    """Keeps ``attempt``'s lease (and liveness lock) while the block runs; see the module doc.

    ``stop_event`` is set once the attempt is fenced (``fenced`` is the same event, the name the
    step runner reads). ``beats`` counts beats the guard answered, ``errors`` beats that failed;
    ``lock_held`` says whether the liveness lock is held right now. ``liveness=False`` never takes
    the lock.
    """

    def __init__(
        self,
        *,
        attempt: Attempt,
        lease_seconds: float | None = None,
        stop_event: threading.Event | None = None,
        liveness: bool = True,
    ):
        self.attempt = attempt
        self.lease_seconds = float(lease_seconds if lease_seconds is not None else conf_get("LEASE_SECONDS"))
        self.interval = max(0.05, self.lease_seconds / 3)
        self.stop_event = self.fenced = stop_event if stop_event is not None else threading.Event()
        self.liveness = liveness
        self.beats = 0
        self.errors = 0
        self.due = math.inf  # monotonic time of the next beat
        self.hold: liveness.Hold | None = None
        self._session: liveness.LivenessSession | None = None
        self._alias = router.db_for_write(Attempt)
        self._ended = False
        # The beats run in a copy of the caller's context, so their log lines carry its variables.
        self._context = contextvars.copy_context()

    @property
    def lock_held(self) -> bool:
        return self.hold is not None and self.hold.locked

    def __enter__(self) -> Heartbeat:
        if self.liveness:
            self._session = liveness.session(using=self._alias)
            if self._session is not None:
                self.hold = self._session.hold(self.attempt)
        self.due = time.monotonic() + self.interval
        _beats().add(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """End the heartbeat: no more beats (one in progress finishes first), the lock given back
        (with the session's next statement, at most ``liveness.CHECK_SECONDS`` later). Idempotent."""
        if self._ended:
            return
        self._ended = True
        beats = _beats()
        beats.remove(self)
        self._let_go()
        if self._session is not None and self._session.unlock_due:
            beats.wake_by(time.monotonic() + liveness.CHECK_SECONDS)

    def _let_go(self) -> None:
        if self._session is not None and self.hold is not None:
            self._session.let_go(self.hold)

    # --- called by the heartbeat thread ---------------------------------------------------------

    def _beat(self) -> bool:
        """One beat; False once the attempt lost its key (it is beaten no more)."""
        try:
            held = guard.heartbeat(attempt=self.attempt, lease_seconds=self.lease_seconds)
        except Exception:  # noqa: BLE001 - a database hiccup: keep the work going, try again next beat
            log.warning("heartbeat of attempt %s failed; trying again at the next beat", self.attempt.pk, exc_info=True)
            self.errors += 1
            _close_if_unusable(self._alias)
            self.due = time.monotonic() + self.interval
            return True
        self.beats += 1
        if not held:
            log.info("attempt %s no longer holds its key: stop", self.attempt.pk)
            self.due = math.inf
            self.stop_event.set()
            return False
        self.due = time.monotonic() + self.interval
        return True


def _close_if_unusable(alias: str) -> None:
    """After a failed beat: keep the thread's connection if it still works, else close it (the
    next beat opens a new one)."""
    connection = connections[alias]
    try:
        usable = connection.connection is not None and connection.is_usable()
    except Exception:  # noqa: BLE001 - whatever it is, the connection is not to be trusted
        usable = False
    if not usable:
        try:
            connection.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may raise; it is gone either way
            log.debug("closing the heartbeat's broken connection failed", exc_info=True)


class _Beats:
    """The process's one heartbeat thread and the live heartbeats it serves."""

    def __init__(self):
        self.pid = os.getpid()
        self.condition = threading.Condition()
        self.live: set[Heartbeat] = set()
        self.thread: threading.Thread | None = None
        self.beating: Heartbeat | None = None  # the heartbeat whose beat is in progress
        self.wake_at = math.inf  # monotonic time the sleeping thread looks next (-inf: it is busy)
        self.requested = math.inf  # the earliest look asked for by wake_by since the thread last slept

    def add(self, heartbeat: Heartbeat) -> None:
        with self.condition:
            self.live.add(heartbeat)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="idempotency-heartbeat", daemon=True)
                self.thread.start()
        wanted = heartbeat.due
        if heartbeat.hold is not None:
            wanted = min(wanted, time.monotonic() + liveness.CHECK_SECONDS)
        self.wake_by(wanted)

    def wake_by(self, moment: float) -> None:
        """Make sure the thread looks again by ``moment`` (monotonic). Under load it already
        does: no wake-up, no lock, per attempt. (``wake_at`` is -inf while the thread is busy, so
        a request made then is always recorded and counted in its next sleep.)"""
        if moment >= self.wake_at:
            return
        with self.condition:
            self.requested = min(self.requested, moment)
            if moment < self.wake_at:
                self.condition.notify_all()

    def remove(self, heartbeat: Heartbeat) -> None:
        """No more beats for ``heartbeat``; a beat of it in progress finishes first, so none runs
        after its block ended (the step runner's beater promises the same)."""
        with self.condition:
            self.live.discard(heartbeat)
            while self.beating is heartbeat:
                self.condition.wait()

    def _run(self) -> None:
        aliases: set[str] = set()
        while True:
            with self.condition:
                self.wake_at = -math.inf  # busy: every wake_by is recorded
                now = time.monotonic()
                due = [heartbeat for heartbeat in self.live if heartbeat.due <= now]
            for heartbeat in due:
                with self.condition:
                    if heartbeat not in self.live:
                        continue  # its block ended meanwhile
                    self.beating = heartbeat
                aliases.add(heartbeat._alias)
                keep = True
                try:
                    keep = heartbeat._context.run(heartbeat._beat)
                finally:
                    with self.condition:
                        self.beating = None
                        if not keep:
                            self.live.discard(heartbeat)
                        self.condition.notify_all()
                if not keep:
                    heartbeat._let_go()  # the key's fate is no longer this attempt's: let its new holder lock
            wait = _IDLE_WAIT_SECONDS
            for session in liveness.sessions():
                again = session.check()
                if again is not None:
                    wait = min(wait, again)
            with self.condition:
                if not self.live and aliases:
                    for alias in aliases:  # no attempt left to beat: no idle connection either
                        connections[alias].close()
                    aliases.clear()
                now = time.monotonic()
                next_beat = min((heartbeat.due for heartbeat in self.live), default=math.inf)
                target, self.requested = min(next_beat, now + wait, self.requested), math.inf
                if target > now:
                    self.wake_at = target
                    self.condition.wait(timeout=min(target - now, _IDLE_WAIT_SECONDS))


_process_beats: _Beats | None = None
_process_beats_lock = threading.Lock()


def _beats() -> _Beats:
    global _process_beats
    current = _process_beats
    if current is not None and current.pid == os.getpid():
        return current
    with _process_beats_lock:
        if _process_beats is None or _process_beats.pid != os.getpid():
            _process_beats = _Beats()  # a forked child: the parent's thread did not come along
        return _process_beats


def _after_fork_in_child() -> None:
    global _process_beats, _process_beats_lock
    _process_beats, _process_beats_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
