"""The heartbeat of a running attempt: a thread that keeps its lease, and (on PostgreSQL) holds
its liveness lock, for as long as the attempt runs.

    stop = threading.Event()
    with Heartbeat(attempt=attempt, lease_seconds=30, stop_event=stop):
        result = do_the_slow_work(stop)               # cooperative work may check stop.is_set()
        guard.complete(attempt=attempt, result=result)  # inside: the lock outlives the commit

Every ``lease_seconds / 3`` the thread extends the lease (``guard.heartbeat``). If the guard
refuses (a newer attempt took the key, an operator released it, the key completed or failed),
the attempt is fenced: the thread sets ``stop_event`` and ends; whatever the work still does is
refused at completion anyway. A database error in a beat is logged and the beat is tried again at
the next interval: it is never raised into the work (a blip must not fail a request or a step).

The thread uses **its own database connection**, opened in the thread and closed when it ends.
That connection lives exactly as long as the attempt, which makes it the place for the
attempt's session advisory lock (``idempotency.liveness``): taken as soon as the thread starts,
released only when the context exits, so the ``with`` block must span the completion or the
failure (their commit first, then the lock goes). Should the connection be lost (the lock with
it), the next beat opens a new one and takes the lock again.
"""
from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

from django.db import connections, router

from . import guard, liveness
from .conf import get as conf_get
from .models import Attempt

log = logging.getLogger(__name__)


class Heartbeat:
    """Extends ``attempt``'s lease every ``lease_seconds / 3`` while the block runs; see the module doc.

    ``stop_event`` is set once the attempt is fenced (``fenced`` is the same event, the name the
    step runner reads). ``beats`` counts beats the guard answered; ``lock_held`` says whether the
    liveness lock is held right now. ``liveness=False`` never takes the lock.
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
        self.lock_held = False
        self._alias = router.db_for_write(Attempt)
        self._locked_on = None  # the DB-API connection the lock was taken on
        self._done = threading.Event()
        # In a copy of the caller's context, so its log lines carry the caller's context variables.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name=f"heartbeat:{attempt.pk}", daemon=True
        )

    # --- the thread ---------------------------------------------------------------------------

    def _take_lock(self) -> None:
        """Take the liveness lock if this thread's current connection does not hold it yet."""
        if not self.liveness or not liveness.enabled(using=self._alias):
            return
        connection = connections[self._alias]
        if self.lock_held and connection.connection is not None and connection.connection is self._locked_on:
            return
        self.lock_held = liveness.acquire(attempt=self.attempt, using=self._alias)
        self._locked_on = connection.connection if self.lock_held else None

    def _after_error(self) -> None:
        """A beat failed: keep the connection if it still works, else close it (the next beat
        opens a new one and takes the lock again; a broken session has lost it already)."""
        self.errors += 1
        connection = connections[self._alias]
        try:
            usable = connection.connection is not None and connection.is_usable()
        except Exception:  # noqa: BLE001 - whatever it is, the connection is not to be trusted
            usable = False
        if not usable:
            self.lock_held, self._locked_on = False, None
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may raise; it is gone either way
                log.debug("closing the heartbeat's broken connection failed", exc_info=True)

    def _run(self) -> None:
        try:
            if not self._done.is_set():  # work that already ended needs no lock
                try:
                    if self.liveness and liveness.enabled(using=self._alias):
                        connections[self._alias].ensure_connection()
                    if not self._done.is_set():  # a short request may have ended while we connected
                        self._take_lock()
                except Exception:  # noqa: BLE001 - no lock: the lease still speaks for the attempt
                    log.warning("attempt %s could not take its liveness lock", self.attempt.pk, exc_info=True)
                    self._after_error()
            while not self._done.wait(self.interval):
                try:
                    held = guard.heartbeat(attempt=self.attempt, lease_seconds=self.lease_seconds)
                except Exception:  # noqa: BLE001 - a database hiccup: keep the work going, try again next beat
                    log.warning("heartbeat of attempt %s failed; trying again at the next beat", self.attempt.pk, exc_info=True)
                    self._after_error()
                    continue
                self.beats += 1
                if not held:
                    log.info("attempt %s no longer holds its key: stop", self.attempt.pk)
                    self.stop_event.set()
                    return
                try:
                    self._take_lock()  # after a reconnect, or once a superseded holder let go
                except Exception:  # noqa: BLE001 - as above
                    log.warning("attempt %s could not take its liveness lock", self.attempt.pk, exc_info=True)
                    self._after_error()
        finally:
            self._close()

    def _close(self) -> None:
        connection = connections[self._alias]
        try:
            if self.lock_held:
                liveness.release(attempt=self.attempt, using=self._alias)
        except Exception:  # noqa: BLE001 - closing the session below releases it anyway
            log.debug("releasing the liveness lock of attempt %s failed", self.attempt.pk, exc_info=True)
        finally:
            self.lock_held, self._locked_on = False, None
            connection.close()  # this thread's own connection (and, with it, any lock left)

    # --- the context manager ------------------------------------------------------------------

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """End the heartbeat: release the lock, close the connection, wait for the thread."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, self.interval))
