"""Liveness beyond the lease: on PostgreSQL, a holder's death is seen at once.

A lease says "the holder was alive a moment ago"; after a crash it keeps the key blocked until
it runs out. On PostgreSQL a running attempt can do better: it holds a **session-level advisory
lock** on its record for its whole duration, on a connection that lives exactly as long as the
attempt (the heartbeat thread's own connection, ``idempotency.heartbeat``), and marks its Attempt
row ``liveness_lock = True`` once it holds it. When the process dies (SIGKILL, OOM, a lost host
whose TCP connection is reset), PostgreSQL ends its session and the lock is released with it. A
claimer that finds the key PROCESSING with a live lease asks ``holder_gone(record)``: if the
holding attempt set the flag and the lock can be taken (``pg_try_advisory_xact_lock``, inside the
claim's transaction), nobody holds it any more, and the claimer supersedes the holder at once,
exactly as it supersedes an expired lease.

**The lock is only a liveness hint. Fencing is what guarantees safety.** Whatever the lock says,
a holder that was wrongly taken over (its heartbeat connection broke while the process lived on,
a database restart dropped every session) still holds a number that is no longer the record's
``attempt_count``: its completion is refused and recorded as FENCED, and its heartbeat tells it
to stop. The reverse mistake, a dead holder that looks alive, only costs waiting for its lease.

The lock is ``pg_advisory_lock(NAMESPACE, record id)``, the two-key form, so this app's locks
never meet another app's one-key locks. Record ids are bigints and the keys are int4, so the
record id is reduced ``id % 2**31``: two records may then share a lock. A collision can only make
a *dead* holder look alive (its twin's live holder holds the lock, so the claimer falls back to
the lease); it can never make a live holder look dead, because a held lock is never free.

Everything here is a no-op on other databases, and when ``IDEMPOTENCY["LIVENESS_LOCKS"]`` is off
(transaction poolers such as PgBouncer in transaction mode, where a session lock is taken on
whichever server connection the pooler lent for one statement and outlives the client or is
shared with strangers). Then the lease alone decides, as on SQLite.
"""
from __future__ import annotations

from django.db import connections, router

from . import conf
from .models import Attempt, IdempotencyRecord
from .states import AttemptStatus

# The first key of every lock this app takes (an arbitrary int4: "idem" in ASCII, 0x6964656d).
NAMESPACE = 1768187245
_KEY_SPACE = 2**31


def lock_key(record_id: int) -> int:
    """The record's lock key, an int4 (see the module doc on collisions)."""
    return int(record_id) % _KEY_SPACE


def _connection(using: str | None = None):
    return connections[using or router.db_for_write(Attempt)]


def enabled(*, using: str | None = None) -> bool:
    """Whether liveness locks are in use on this database (PostgreSQL and the setting on)."""
    return _connection(using).vendor == "postgresql" and bool(conf.get("LIVENESS_LOCKS"))


def acquire(*, attempt: Attempt, using: str | None = None) -> bool:
    """Take ``attempt``'s lock on this thread's connection, for the life of that connection's
    session, and mark the attempt as holding it. True when the lock is held.

    Call it from the connection that lives exactly as long as the attempt (the heartbeat
    thread's). Never blocks: if the lock is held elsewhere (the attempt this one superseded is
    still alive and working, or a colliding record's holder), the answer is False, the flag stays
    unset and only the lease speaks for this attempt; the caller may try again later. One round
    trip: the try-lock and the flag's conditional UPDATE are one statement.
    """
    connection = _connection(using)
    if not enabled(using=connection.alias):
        return False
    qn = connection.ops.quote_name
    table = qn(Attempt._meta.db_table)
    flag, pk, status = (qn(Attempt._meta.get_field(name).column) for name in ("liveness_lock", "id", "status"))
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH lock AS (SELECT pg_try_advisory_lock(%s, %s) AS held), "
            # Only a RUNNING attempt is marked: one that already ended has nothing to keep alive.
            f"marked AS (UPDATE {table} SET {flag} = true FROM lock WHERE lock.held AND {pk} = %s "
            f"AND {status} = %s RETURNING 1) "
            f"SELECT held FROM lock",
            [NAMESPACE, lock_key(attempt.record_id), Attempt._meta.pk.get_db_prep_value(attempt.pk, connection),
             AttemptStatus.RUNNING],
        )
        return bool(cursor.fetchone()[0])


def release(*, attempt: Attempt, using: str | None = None) -> None:
    """Let go of ``attempt``'s lock on this thread's connection (after its completion or failure
    committed). Closing that connection releases it too; this says so explicitly."""
    connection = _connection(using)
    if not enabled(using=connection.alias) or connection.connection is None:
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [NAMESPACE, lock_key(attempt.record_id)])


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
