"""pipeline-ops' PostgreSQL broker for django-q2: ``FOR UPDATE SKIP LOCKED`` and ``LISTEN/NOTIFY``.

A subclass of django-q2's ORM broker over the same table (``django_q_ormq``), selected with
``Q_CLUSTER["broker_class"]`` (``PIPELINE_OPS_BROKER=postgres``, the default on PostgreSQL).
What stays: the enqueue is an INSERT through the models' database alias, so it joins the caller's
transaction (the outbox); django-q2's admin (Queued tasks), ``qcluster``, ``qinfo`` and the
monitor's ack (a DELETE by id, which deletes nothing when the step's completion already removed
the row) work unchanged. What changes (docs/queue.md):

* **dequeue is one statement**: ``UPDATE ... SET lock = statement_timestamp() + retry WHERE id IN
  (SELECT id ... WHERE key = %s AND lock <= statement_timestamp() ORDER BY id LIMIT bulk FOR UPDATE
  SKIP LOCKED) RETURNING id, payload``. Two dequeuers never lock the same row (SKIP LOCKED), and a
  row whose lock is live is never due, so no row is handed out twice within its lock period.
  django-q2's ORM broker SELECTs, then UPDATEs each row under a compare-and-set: 1 + bulk round trips.
* **every lock time is the database's clock** (enqueue and dequeue), never the host's: a worker
  host whose clock is off can neither take a live row nor hide a due one.
* **wake-up on NOTIFY**: the enqueue's INSERT carries ``pg_notify(<queue's channel>, '')`` in the
  same statement (a CTE: no extra round trip), delivered when the enqueuing transaction commits.
  An empty dequeue then waits for a notification on a dedicated listening connection for up to
  ``poll`` seconds instead of sleeping; a row that comes due without an enqueue (a crashed
  worker's, when its lock expires) is seen at the latest ``poll`` seconds later.
* **faults**: a dropped connection or terminated backend in the dequeue is logged and the pusher
  carries on (the next dequeue reconnects); when the listening connection drops, empty dequeues
  fall back to plain polling and the listener is reconnected a little later.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time

from django.db import connections
from django_q.brokers.orm import ORM
from django_q.conf import Conf

log = logging.getLogger(__name__)

# While the listening connection is down, an empty dequeue sleeps at most this long (even with a
# large ``poll``) and then tries to connect it again: a dead listener must not deafen the queue.
LISTEN_RETRY_SECONDS = 1.0
# After an infrastructure error in the dequeue itself, pause this long (at most ``poll``) before
# the next try, so a database that is down is not hammered by a tight loop.
DEQUEUE_ERROR_PAUSE_SECONDS = 0.5

# Connections of forked parents are kept referenced here, never closed nor garbage collected:
# closing (or finalizing) a socket inherited through fork would end the parent's session.
_INHERITED: list = []


def notify_channel(queue: str) -> str:
    """The NOTIFY channel of a queue (its ``OrmQ.key``). Derived by a hash so that any queue name
    gives a valid identifier under PostgreSQL's 63-byte limit; the same in SQL:
    ``'django_q_' || md5(key)``."""
    return "django_q_" + hashlib.md5(queue.encode()).hexdigest()


def _db():
    """The database alias of the queue table: ``Q_CLUSTER["orm"]``, the models' alias (settings)."""
    return connections[Conf.ORM or "default"]


def _table() -> str:
    from django_q.models import OrmQ

    return _db().ops.quote_name(OrmQ._meta.db_table)


def enqueue_sql(*, rows: int = 1) -> str:
    """One statement that inserts ``rows`` queue rows (params: ``key, payload`` per row, then the
    channel) with the database's clock as their lock, and notifies the queue's channel. The
    notification is sent at commit, once per transaction and channel (PostgreSQL folds equal
    notifications of one transaction), so a batch costs one."""
    values = ", ".join(["(%s, %s, statement_timestamp())"] * rows)
    return (
        f"WITH ins AS (INSERT INTO {_table()} (key, payload, lock) VALUES {values} RETURNING id) "
        "SELECT id, pg_notify(%s, '') FROM ins ORDER BY id"
    )


def dequeue_sql() -> str:
    """The dequeue: lock up to ``bulk`` due rows nobody else holds, oldest first, set their lock
    to the database's now + retry, return them. ``FOR UPDATE SKIP LOCKED`` makes concurrent
    dequeuers take disjoint rows without waiting on each other; the row lock is re-checked
    against the newest row version (READ COMMITTED), so a row another dequeuer has just taken
    (its lock now in the future) is not due any more. Params: retry seconds, key, bulk."""
    table = _table()
    return (
        f"UPDATE {table} SET lock = statement_timestamp() + make_interval(secs => %s) "
        f"WHERE id IN (SELECT id FROM {table} WHERE key = %s AND lock <= statement_timestamp() "
        "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) "
        "RETURNING id, payload"
    )


class PostgresBroker(ORM):
    """django-q2's ORM broker with a one-statement SKIP LOCKED dequeue and a NOTIFY wake-up."""

    def __init__(self, list_key: str | None = None):
        super().__init__(list_key=list_key)
        self._listener = None
        self._listener_pid = None
        self._listener_retry_at = 0.0
        connection = _db()
        if connection.vendor != "postgresql":
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                f"The postgres broker needs a PostgreSQL database; Q_CLUSTER['orm'] = {connection.alias!r} is {connection.vendor}."
            )

    def __setstate__(self, state):
        super().__setstate__(state)
        self._listener, self._listener_pid, self._listener_retry_at = None, None, 0.0

    @property
    def channel(self) -> str:
        return notify_channel(self.list_key or Conf.CLUSTER_NAME)

    def info(self) -> str:
        if not self._info:
            self._info = f"PostgreSQL {_db().alias} (SKIP LOCKED, LISTEN/NOTIFY)"
        return self._info

    # --- enqueue ---------------------------------------------------------------------------
    def enqueue(self, task):
        """One INSERT ... RETURNING with the NOTIFY in the same statement; it joins the caller's
        transaction when there is one (the notification then fires at its commit)."""
        key = self.list_key or Conf.CLUSTER_NAME
        with _db().cursor() as cursor:
            cursor.execute(enqueue_sql(rows=1), [key, task, notify_channel(key)])
            return cursor.fetchone()[0]

    def enqueue_many(self, packages: list[str]) -> list[int]:
        """Several signed packages in one statement (a batch of submissions); one NOTIFY."""
        if not packages:
            return []
        key = self.list_key or Conf.CLUSTER_NAME
        params: list = []
        for package in packages:
            params += [key, package]
        with _db().cursor() as cursor:
            cursor.execute(enqueue_sql(rows=len(packages)), [*params, notify_channel(key)])
            return [row[0] for row in cursor.fetchall()]

    # --- dequeue ---------------------------------------------------------------------------
    def dequeue(self):
        """Up to ``bulk`` ``(id, payload)`` pairs; on an empty queue, wait for a NOTIFY (at most
        ``poll`` seconds) and return None, as django-q2's pusher expects."""
        try:
            rows = self._take()
        except Exception as exc:
            from idempotency.faults import is_infrastructure_error

            if not is_infrastructure_error(exc):
                raise  # a bug, not the platform: django-q2's pusher logs it and the sentinel restarts it
            log.warning("queue %s: dequeue failed (%s: %s); retrying on a new connection",
                        self.list_key, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            self._drop_django_connection()
            time.sleep(min(Conf.POLL, DEQUEUE_ERROR_PAUSE_SECONDS))
            return None
        if rows:
            return rows
        self._wait()
        return None

    def _take(self) -> list[tuple[int, str]]:
        with _db().cursor() as cursor:
            cursor.execute(dequeue_sql(), [float(Conf.RETRY), self.list_key, int(Conf.BULK or 1)])
            return [(row[0], row[1]) for row in cursor.fetchall()]

    @staticmethod
    def _drop_django_connection() -> None:
        connection = _db()
        if connection.in_atomic_block:
            return  # the caller's transaction: theirs to roll back (tests' in-process drains)
        try:
            connection.close()
        except Exception:  # noqa: BLE001 - closing a dead connection may itself fail
            connection.connection = None

    # --- the listening connection ------------------------------------------------------------
    def _wait(self) -> None:
        """Block until a NOTIFY on the queue's channel or ``poll`` seconds, whichever first.
        Without a listener (not connected yet, or dropped), sleep at most LISTEN_RETRY_SECONDS."""
        poll = float(Conf.POLL)
        listener, fresh = self._listening()
        if listener is None:
            time.sleep(min(poll, LISTEN_RETRY_SECONDS))
            return
        if fresh:
            # LISTEN has just started: a row committed before it sent a notification nobody
            # heard. Dequeue again at once; from now on every commit wakes us.
            return
        try:
            for _ in listener.notifies(timeout=poll, stop_after=1):
                break
            # Notifications that queued up while the pusher was busy would each wake one more
            # empty dequeue: the dequeue that follows sees all their rows, so drop them.
            for _ in listener.notifies(timeout=0):
                pass
        except Exception as exc:  # noqa: BLE001 - any failure of the listener means: poll instead
            self._listener_lost(exc)

    def _listening(self):
        """``(connection, just_connected)``; ``(None, False)`` while the listener is down."""
        if self._listener is not None and self._listener_pid == os.getpid():
            if not self._listener.closed:
                return self._listener, False
            self._listener_lost(None)
        elif self._listener is not None:
            _INHERITED.append(self._listener)  # a forked parent's: never close it from here
            self._listener = None
        if time.monotonic() < self._listener_retry_at:
            return None, False
        try:
            self._listener = self._connect_listener()
            self._listener_pid = os.getpid()
        except Exception as exc:  # noqa: BLE001 - the database may be down: poll, retry later
            self._listener_lost(exc)
            return None, False
        return self._listener, True

    def _connect_listener(self):
        import psycopg
        from psycopg import sql

        params = _db().get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        params.pop("server_side_binding", None)
        params.setdefault("connect_timeout", 5)
        listener = psycopg.connect(**params, autocommit=True)
        try:
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            listener.close()
            raise
        return listener

    def _listener_lost(self, exc: BaseException | None) -> None:
        if exc is not None:
            log.warning("queue %s: the listening connection is down (%s); polling every %.1f s until it is back",
                        self.list_key, type(exc).__name__, min(float(Conf.POLL), LISTEN_RETRY_SECONDS))
        if self._listener is not None and self._listener_pid == os.getpid():
            try:
                self._listener.close()
            except Exception:  # noqa: BLE001
                pass
        self._listener = None
        self._listener_retry_at = time.monotonic() + LISTEN_RETRY_SECONDS

    def close(self) -> None:
        """Close this process's listening connection (tests, and a broker dropped on purpose)."""
        if self._listener is not None and self._listener_pid == os.getpid():
            self._listener.close()
        self._listener = None

    # --- the ack and friends ----------------------------------------------------------------
    def acknowledge(self, task_id):
        """A DELETE by id; when the step's completion already deleted the row, it deletes nothing."""
        self.delete(task_id)

    def delete(self, task_id):
        with _db().cursor() as cursor:
            cursor.execute(f"DELETE FROM {_table()} WHERE id = %s", [task_id])

    def queue_size(self) -> int:
        return self._count("<=")

    def lock_size(self) -> int:
        return self._count(">")

    def _count(self, op: str) -> int:
        with _db().cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {_table()} WHERE key = %s AND lock {op} statement_timestamp()", [self.list_key])
            return cursor.fetchone()[0]
