"""Liveness beyond the lease: on PostgreSQL, a holder's death is seen at once.

A lease says "the holder was alive a moment ago"; after a crash it keeps the key blocked until
it runs out. On PostgreSQL a running attempt can do better: it holds a **session-level advisory
lock** on its record for its whole duration, on a session that lives as long as its process (the
process's **liveness session**, ``LivenessSession``: one connection per process, shared by every
attempt the process runs), and marks its Attempt row ``liveness_lock = True`` once it holds it.
When the process dies (SIGKILL, OOM, a lost host whose TCP connection is reset), PostgreSQL ends
its session and every lock of the process is released with it. A claimer that finds the key
PROCESSING with a live lease asks ``holder_gone(record)``: if the holding attempt set the flag
and the lock can be taken (``pg_try_advisory_xact_lock``, inside the claim's transaction), nobody
holds it any more, and the claimer supersedes the holder at once, exactly as it supersedes an
expired lease.

**The lock is only a liveness hint. Fencing is what guarantees safety.** Whatever the lock says,
a holder that was wrongly taken over (its liveness session was terminated while the process
lived on, a database restart dropped every session) still holds a number that is no longer the
record's ``attempt_count``: its completion is refused and recorded as FENCED, and its heartbeat
tells it to stop. The reverse mistake, a dead holder that looks alive, only costs waiting for its
lease.

**One session per process.** Session advisory locks stack per session, so the one session holds
the locks of all the process's live attempts at once: ``hold(attempt)`` takes one when the work
starts (one statement: the try-lock and the flag's UPDATE), ``let_go(hold)`` gives it back once
the attempt's completion or failure has committed (one ``pg_advisory_unlock``). No connection is
opened per attempt: opening one cost about as much as the whole keyed request. The session is
opened lazily, closed after ``IDLE_CLOSE_SECONDS`` without live attempts, and never shared with
a forked child (the child drops the parent's without closing it, and opens its own).

**A lost session.** If the session ends while the process lives (terminated, restarted, a
network reset), its locks are gone at once and a claimer may wrongly take over meanwhile
(fenced, see above). The process notices at its next use of the session, or within
``CHECK_SECONDS`` (the heartbeat thread checks an idle session for a server-side end while it
holds locks), reconnects, and takes again, in one statement, the locks of the attempts that
*still hold their keys*: an attempt taken over in the window is not locked again (its key is
lost for good, ``attempt_count`` only grows), so the new holder can take its own lock.

The lock is ``pg_advisory_lock(NAMESPACE, record id)``, the two-key form, so this app's locks
never meet another app's one-key locks. Record ids are bigints and the keys are int4, so the
record id is reduced ``id % 2**31``: two records may then share a lock. A collision can only make
a *dead* holder look alive (its twin's live holder holds the lock, so the claimer falls back to
the lease); it can never make a live holder look dead, because a held lock is never free. Two
live attempts of one process that share a key (a collision, or a superseded attempt and its
successor) each hold it once in the same session: it stays held until both let go.

Everything here is a no-op on other databases, and when ``IDEMPOTENCY["LIVENESS_LOCKS"]`` is off
(transaction poolers such as PgBouncer in transaction mode, where a session lock is taken on
whichever server connection the pooler lent for one statement and outlives the client or is
shared with strangers). Then the lease alone decides, as on SQLite.
"""
from __future__ import annotations

import atexit
import logging
import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, router

from . import conf
from .models import Attempt, IdempotencyRecord
from .states import AttemptStatus, RecordStatus

log = logging.getLogger(__name__)

# The first key of every lock this app takes (an arbitrary int4: "idem" in ASCII, 0x6964656d).
NAMESPACE = 1768187245
_KEY_SPACE = 2**31

# The liveness session's application_name is this plus ":<pid>", so an operator (and a test)
# can tell each process's one session in pg_stat_activity.
APPLICATION_NAME = "idempotency-liveness"
# While attempts hold locks on it, an idle session is checked this often for a server-side end
# (terminated, restarted): a poll of its socket, no round trip. It bounds how long a process
# that lost its session goes without its locks (a wrongful takeover meanwhile is fenced).
CHECK_SECONDS = 0.25
# A session with no live attempt for this long is closed: a process that serves no keyed work
# keeps no idle connection (and a test database can be dropped). Under load it never idles.
IDLE_CLOSE_SECONDS = 2.0


def lock_key(record_id: int) -> int:
    """The record's lock key, an int4 (see the module doc on collisions)."""
    return int(record_id) % _KEY_SPACE


def _connection(using: str | None = None):
    return connections[using or router.db_for_write(Attempt)]


def enabled(*, using: str | None = None) -> bool:
    """Whether liveness locks are in use on this database (PostgreSQL and the setting on)."""
    return _connection(using).vendor == "postgresql" and bool(conf.get("LIVENESS_LOCKS"))


def holder_gone(record: IdempotencyRecord) -> bool:
    """Whether the attempt holding ``record`` (number ``attempt_count``) is known to be dead:
    it took its liveness lock, and the lock is free now. False whenever it cannot be known
    (the flag unset, locks off, another database): then the lease decides.

    Must run inside the claim's transaction, under the record's row lock: the lock taken here is
    transaction-level and goes with the claim's commit, after which the new holder takes its own.
    """
    connection = _connection()
    if not enabled(using=connection.alias):
        return False
    qn = connection.ops.quote_name
    column = {name: qn(Attempt._meta.get_field(name).column) for name in ("record", "number", "liveness_lock", "status")}
    with connection.cursor() as cursor:
        # The target list is evaluated only for the one row that matches (the unique
        # (record, number) index): no lock is tried unless the holder took one.
        cursor.execute(
            f"SELECT pg_try_advisory_xact_lock(%s, %s) FROM {qn(Attempt._meta.db_table)} "
            f"WHERE {column['record']} = %s AND {column['number']} = %s AND {column['liveness_lock']} "
            f"AND {column['status']} = %s",
            [NAMESPACE, lock_key(record.pk), record.pk, record.attempt_count, AttemptStatus.RUNNING],
        )
        row = cursor.fetchone()
    return bool(row and row[0])


# --- the holder's side: the process's liveness session ----------------------------------------


def _take_sql(connection) -> str:
    """One statement that first gives back the locks in an array of keys (attempts that ended
    since the last statement: ``LivenessSession.let_go``), then, for each attempt id in a second
    array, tries the attempt's lock *only if the attempt still holds its key* (RUNNING, its
    record PROCESSING under its number), and sets the flag where the lock was taken and the flag
    is not set yet. Rows: (attempt id, held), or one row of NULLs when no attempt matched; an
    attempt that no longer holds its key has no row.

    The order of the two does not matter: the locks stack, one per attempt, so a key both given
    back and taken (a key's next attempt in the same process) ends up held once either way."""
    qn = connection.ops.quote_name
    a_table, r_table = qn(Attempt._meta.db_table), qn(IdempotencyRecord._meta.db_table)

    def a(name):
        return qn(Attempt._meta.get_field(name).column)

    def r(name):
        return qn(IdempotencyRecord._meta.get_field(name).column)

    # The target list runs only for the rows the join and WHERE kept: a lost key is never locked.
    # The flag's UPDATE skips a set flag (a lock taken again): no write, no wait on the row.
    return (
        f"WITH freed AS (SELECT pg_advisory_unlock(%s::int, k) FROM unnest(%s::int[]) AS k), "
        f"got AS (SELECT a.{a('id')} AS attempt_id, "
        f"pg_try_advisory_lock(%s::int, (r.{r('id')} %% {_KEY_SPACE})::int) AS held "
        f"FROM {a_table} a JOIN {r_table} r ON r.{r('id')} = a.{a('record')} "
        f"WHERE a.{a('id')} = ANY(%s) AND a.{a('status')} = %s AND r.{r('status')} = %s "
        f"AND r.{r('attempt_count')} = a.{a('number')}), "
        f"marked AS (UPDATE {a_table} SET {a('liveness_lock')} = true FROM got "
        f"WHERE got.held AND {a_table}.{a('id')} = got.attempt_id AND NOT {a_table}.{a('liveness_lock')} RETURNING 1) "
        # count(*) over freed makes sure every unlock runs, whether or not an attempt matched.
        f"SELECT got.attempt_id, got.held FROM (SELECT count(*) FROM freed) AS f LEFT JOIN got ON true"
    )


_UNLOCK_SQL = "SELECT count(pg_advisory_unlock(%s::int, k)) FROM unnest(%s::int[]) AS k"


@dataclass(eq=False)
class Hold:
    """One live attempt of the process in the liveness session. ``locked``: its lock is held in
    the session right now; ``lost``: the attempt no longer holds its key (never locked again)."""

    attempt: Attempt
    locked: bool = False
    lost: bool = False
    ended: bool = False
    backend_pid: int | None = field(default=None, repr=False)  # the session that holds the lock

    @property
    def key(self) -> int:
        return lock_key(self.attempt.record_id)


class LivenessSession:
    """The process's one liveness connection (a raw psycopg connection in autocommit, its own
    session, ``application_name`` ``idempotency-liveness:<pid>``) and the live attempts whose
    locks it holds. Every use is under one ``threading.Lock``: a statement at a time, and the
    bookkeeping (which attempts are locked) always matches the session's locks.

    Any error on the connection leaves its state unknown, so the connection is closed (its locks
    with it) and every live attempt is taken again on a new one, rather than guessed at.
    """

    def __init__(self, alias: str):
        self.alias = alias
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.connection = None  # psycopg.Connection, opened lazily
        self.backend_pid: int | None = None
        self.connects = 0  # connections opened so far (tests and operators read it)
        self.live: dict[Any, Hold] = {}  # attempt pk -> its hold
        # Keys of ended attempts whose locks the session still holds: given back with the next
        # statement (the next attempt's take) or by ``check`` within CHECK_SECONDS, whichever
        # comes first. Under load that saves every attempt its own unlock round trip.
        self.unlock_due: list[int] = []
        self.idle_since = time.monotonic()

    # --- what the heartbeat calls -------------------------------------------------------------

    def hold(self, attempt: Attempt) -> Hold:
        """Take ``attempt``'s lock before its work starts. Never raises: without the lock (the
        database unreachable, the lock held by the attempt this one superseded, still running
        elsewhere) only the lease speaks for the attempt, and ``check`` tries again."""
        hold = Hold(attempt=attempt)
        with self.lock:
            self.live[attempt.pk] = hold
            try:
                self._take([hold])
            except Exception:  # noqa: BLE001 - no lock: the lease still speaks for the attempt
                log.warning("attempt %s could not take its liveness lock", attempt.pk, exc_info=True)
                self._drop()
        return hold

    def let_go(self, hold: Hold) -> None:
        """Give ``hold``'s lock back. Call it only once the attempt's completion or failure has
        committed (or once it lost its key): until then a retry must see it alive.

        The unlock itself rides on the session's next statement, at most CHECK_SECONDS later
        (``unlock_due``): held a moment longer, a lock whose key's fate has committed can only
        delay the lock of that key's next attempt in another process (its lease covers it
        meanwhile); it never makes a live holder look dead."""
        with self.lock:
            hold.ended = True
            if self.live.get(hold.attempt.pk) is hold:
                del self.live[hold.attempt.pk]
            if not self.live:
                self.idle_since = time.monotonic()
            if hold.locked:
                hold.locked = False
                if self.connection is not None and self.pid == os.getpid():
                    self.unlock_due.append(hold.key)

    def check(self) -> float | None:
        """Called by the process's heartbeat thread: notice a session the server ended, take
        again the locks of live attempts that lack theirs, close a session idle too long.
        Returns the seconds until it wants to be called again (None: not until a new hold)."""
        with self.lock:
            if self.pid != os.getpid():
                return None
            if self.unlock_due and self.connection is not None:
                keys, self.unlock_due = self.unlock_due, []
                try:
                    self.connection.execute(_UNLOCK_SQL, [NAMESPACE, keys])
                except Exception:  # noqa: BLE001 - the locks went with the session; the live ones are taken again below
                    log.warning("giving back %d liveness locks failed; the session is renewed", len(keys), exc_info=True)
                    self._drop()
            if not self.live:
                if self.connection is None:
                    return None
                idle = time.monotonic() - self.idle_since
                if idle >= IDLE_CLOSE_SECONDS:
                    self._close()
                    return None
                return IDLE_CLOSE_SECONDS - idle
            if self.connection is not None and self._ended_by_server():
                log.warning(
                    "the liveness session (backend %s) ended; %d live attempts take their locks again on a new one",
                    self.backend_pid, len(self.live),
                )
                self._drop()
            pending = [hold for hold in self.live.values() if not hold.locked and not hold.lost]
            if pending:
                try:
                    self._take(pending)
                except Exception:  # noqa: BLE001 - tried again at the next check
                    log.warning("%d attempts could not take their liveness locks again", len(pending), exc_info=True)
                    self._drop()
            return CHECK_SECONDS

    def close(self) -> None:
        """Close the session (releasing every lock in it). At exit, and for tests. The locks of
        ended attempts are given back first, with a reply: once this returns they are free (a
        goodbye alone is handled by the server when it gets to it)."""
        with self.lock:
            if self.pid != os.getpid():
                return
            if self.unlock_due and self.connection is not None:
                try:
                    self.connection.execute(_UNLOCK_SQL, [NAMESPACE, self.unlock_due])
                except Exception:  # noqa: BLE001 - closing releases them anyway
                    log.debug("giving back the liveness locks at close failed", exc_info=True)
            self._drop()

    # --- inside the lock ----------------------------------------------------------------------

    def _connect(self):
        import psycopg

        params = _connection(self.alias).get_connection_params()
        params.pop("cursor_factory", None)  # psycopg's own cursor: no Django cursor wrapper here
        params["application_name"] = f"{APPLICATION_NAME}:{os.getpid()}"
        params.setdefault("connect_timeout", 10)
        params["prepare_threshold"] = 2  # the same few statements all day: prepare them
        connection = psycopg.connect(**params, autocommit=True)
        # The flag is a hint (losing it in a crash makes a holder look alive: its lease decides),
        # so its commit need not wait for the WAL to reach the disk.
        connection.execute("SET synchronous_commit TO off")
        self.connection = connection
        self.backend_pid = connection.info.backend_pid
        self.connects += 1

    def _take(self, holds: list[Hold]) -> None:
        if self.connection is None:
            self._connect()
        connection = _connection(self.alias)
        ids = [Attempt._meta.pk.get_db_prep_value(hold.attempt.pk, connection) for hold in holds]
        keys, self.unlock_due = self.unlock_due, []
        params = [NAMESPACE, keys, NAMESPACE, ids, AttemptStatus.RUNNING.value, RecordStatus.PROCESSING.value]
        rows = {str(pk): held for pk, held in self.connection.execute(_take_sql(connection), params).fetchall() if pk is not None}
        for hold, pk in zip(holds, ids):
            held = rows.get(str(pk))
            if held is None:
                hold.lost = True  # its key was taken over (or it ended): never locked again
            elif held:
                hold.locked, hold.backend_pid = True, self.backend_pid

    def _ended_by_server(self) -> bool:
        """Whether the idle session was ended by the server: it has nothing to say unasked, so
        anything readable on its socket (a FATAL message, an EOF) is asked about with a round trip."""
        connection = self.connection
        if connection.closed or connection.broken:
            return True
        try:
            readable, _, _ = select.select([connection.fileno()], [], [], 0)
            if not readable:
                return False
            connection.execute("SELECT 1")
            return False
        except Exception:  # noqa: BLE001 - whatever it is, the session is not to be trusted
            return True

    def _drop(self) -> None:
        """Close the connection (its locks go with it) and mark every live attempt unlocked."""
        self._close()
        self.unlock_due = []
        for hold in self.live.values():
            hold.locked = False

    def _close(self) -> None:
        connection, self.connection, self.backend_pid = self.connection, None, None
        self.unlock_due = []
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may raise; it is gone either way
                log.debug("closing the liveness session failed", exc_info=True)


_sessions: dict[str, LivenessSession] = {}
_sessions_lock = threading.Lock()
_inherited: list[Any] = []  # connections a forked child must neither use nor close


def session(*, using: str | None = None) -> LivenessSession | None:
    """This process's liveness session for the database (None where locks are not in use)."""
    connection = _connection(using)
    if not enabled(using=connection.alias):
        return None
    current = _sessions.get(connection.alias)
    if current is not None and current.pid == os.getpid():
        return current
    with _sessions_lock:
        current = _sessions.get(connection.alias)
        if current is None or current.pid != os.getpid():
            if current is not None:  # forked without the at-fork hook: leave the parent's alone
                _disown(current)
            current = _sessions[connection.alias] = LivenessSession(connection.alias)
        return current


def sessions() -> list[LivenessSession]:
    """This process's sessions (the heartbeat thread checks each)."""
    return [s for s in list(_sessions.values()) if s.pid == os.getpid()]


def _disown(inherited: LivenessSession) -> None:
    """In a forked child: forget the parent's session without touching it. The child's copy of
    the socket is pointed at /dev/null first, so that nothing the child does, not even the
    connection's finalizer sending its goodbye, can reach (and end) the parent's session."""
    connection = inherited.connection
    inherited.connection = None
    inherited.live = {}
    if connection is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, connection.pgconn.socket)
        finally:
            os.close(devnull)
    except Exception:  # noqa: BLE001 - the socket is already gone in this process
        log.debug("could not detach the inherited liveness socket", exc_info=True)
    _inherited.append(connection)


def _close_at_exit() -> None:
    """A process that ends cleanly says goodbye: its locks are free when it is gone."""
    for current in sessions():
        current.close()


atexit.register(_close_at_exit)


def _after_fork_in_child() -> None:
    global _sessions_lock
    _sessions_lock = threading.Lock()  # the parent's may have been held by another thread
    for inherited in list(_sessions.values()):
        _disown(inherited)
    _sessions.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
