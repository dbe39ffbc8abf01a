"""The guard: claim a key, heartbeat, complete or fail, with a fencing number and a lease.

Every function here is a service: keyword-only, typed, and built from conditional UPDATEs so
that losing a race shows up as "0 rows updated" rather than as a silent double write.

The rule that makes a late attempt harmless: every move an attempt makes on its record is
conditional on ``status = PROCESSING and attempt_count = attempt.number``. Once a newer attempt
has claimed the key (raising ``attempt_count``), the old one can only write on its own Attempt row.
"""
from __future__ import annotations

import os
import socket
import traceback as traceback_module
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, connections, router, transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, F, OuterRef, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from . import conf
from .clock import db_now, db_now_expression
from .models import Attempt, IdempotencyRecord
from .policy import NO_RETRY, RetryPolicy
from .states import AttemptStatus, RecordStatus, attempt_sources

_HOSTNAME = socket.gethostname()


def default_worker() -> str:
    return f"{_HOSTNAME}:{os.getpid()}"


# --- claim outcomes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """The caller now holds the key: run the work, then ``complete`` or ``fail``."""

    attempt: Attempt

    @property
    def record(self) -> IdempotencyRecord:
        return self.attempt.record


@dataclass(frozen=True)
class Replay:
    """The key is COMPLETED: return ``result`` and run nothing."""

    record: IdempotencyRecord

    @property
    def result(self) -> Any:
        return self.record.result


@dataclass(frozen=True)
class InFlight:
    """Another attempt holds the key, or its retry is not due yet: do not run; try again at ``until``."""

    record: IdempotencyRecord
    until: datetime

    def retry_after_seconds(self, *, now: datetime | None = None) -> int:
        remaining = (self.until - (now or timezone.now())).total_seconds()
        return max(1, int(remaining + 0.999))


@dataclass(frozen=True)
class Mismatch:
    """The key was used with another operation or fingerprint: do not run."""

    record: IdempotencyRecord


@dataclass(frozen=True)
class Failed:
    """The key failed for good (no retry allowed): do not run; an operator may ``reopen`` it."""

    record: IdempotencyRecord


ClaimOutcome = Claimed | Replay | InFlight | Mismatch | Failed


@dataclass(frozen=True)
class Completion:
    """What ``complete`` did. ``fenced``: this attempt lost the key and its write was rolled back;
    ``result`` is then the winner's stored result (None if nobody has completed yet)."""

    fenced: bool
    result: Any
    reason: str = ""


@dataclass(frozen=True)
class FailureOutcome:
    """What ``fail`` decided. ``retry_at`` None means terminal; ``held`` False means the attempt had
    already lost the key, so only its own Attempt row was written."""

    retry_at: datetime | None
    held: bool

    @property
    def terminal(self) -> bool:
        return self.held and self.retry_at is None


# --- claim --------------------------------------------------------------------------------------


def claim(
    *,
    scope: str,
    key: str,
    operation: str,
    fingerprint: str,
    lease_seconds: float | None = None,
    max_attempts: int | None = None,
    worker: str | None = None,
    now: datetime | None = None,
    on_claimed: Callable[[Attempt], Any] | None = None,
    lock_first: Callable[[], Any] | None = None,
) -> ClaimOutcome:
    """Take the key for a new attempt, or say why not.

    The unique constraint on ``(scope, key)`` arbitrates: the insert either wins or conflicts,
    and a conflict is decided under a row lock on the existing record. Each claim raises
    ``attempt_count``; the new Attempt gets that number. ``max_attempts`` bounds takeovers of
    expired leases (a worker that keeps dying mid-step is dead-lettered as FAILED).

    ``lock_first()`` runs first in the claim's transaction: it locks the caller's own rows that
    ``on_claimed`` will write, so they are locked *before* the key, as every other transaction
    that touches both locks them (the lock order, ``docs/guard.md``).
    ``on_claimed(attempt)`` runs inside the claim's transaction, right after the new attempt is
    written, so the caller's own "started" bookkeeping commits with the claim (one commit, not
    two). If it raises, the claim is rolled back (no attempt; the record as it was) and the
    exception propagates.

    ``now`` is the clock that decides leases and due retries: leave it None for the database's
    (``idempotency.clock``); tests pass a time to make a retry due.

    Never raises for a busy or used key: the outcome says so.
    """
    lease = timedelta(seconds=lease_seconds if lease_seconds is not None else conf.get("LEASE_SECONDS"))
    worker = worker or default_worker()
    key_exists = False
    for _ in range(3):
        if not key_exists:
            record = IdempotencyRecord(
                scope=scope, key=key, operation=operation, fingerprint=fingerprint,
                status=RecordStatus.PROCESSING, attempt_count=1,
            )
            attempt = Attempt(record=record, number=1, worker=worker)
            try:
                if on_claimed is None and lock_first is None:
                    _insert_new(record, attempt, lease=lease, now=now)
                else:
                    # One transaction: the caller's locks, the insert, the caller's bookkeeping.
                    # A unique violation rolls it back whole (no savepoint needed); the locked
                    # path below then runs in a transaction of its own.
                    with transaction.atomic():
                        if lock_first is not None:
                            lock_first()
                        _insert_new(record, attempt, lease=lease, now=now, savepoint=False)
                        if on_claimed is not None:
                            on_claimed(attempt)
                return Claimed(attempt)
            except IntegrityError:
                key_exists = True  # decide below, under the record's row lock
        with transaction.atomic():
            if lock_first is not None:
                lock_first()
            locked = IdempotencyRecord.objects.select_for_update().filter(scope=scope, key=key)
            if now is None:
                # Read the database's clock in the statement that locks the row: the lease is
                # judged in the time it was written in, whatever this host's clock says.
                locked = locked.annotate(db_now=db_now_expression())
            record = locked.first()
            if record is not None:
                outcome = _claim_existing(
                    record, operation=operation, fingerprint=fingerprint, lease=lease,
                    max_attempts=max_attempts, worker=worker, now=now or record.db_now,
                )
                if on_claimed is not None and isinstance(outcome, Claimed):
                    on_claimed(outcome.attempt)
                return outcome
        key_exists = False  # purged between our insert and our lock: insert again
    raise RuntimeError(f"could not claim {scope}/{key}: the record kept disappearing")


def _claim_existing(
    record: IdempotencyRecord,
    *,
    operation: str,
    fingerprint: str,
    lease: timedelta,
    max_attempts: int | None,
    worker: str,
    now: datetime,
) -> ClaimOutcome:
    if record.forgotten_at is not None:
        return _claim_forgotten(record, operation=operation, fingerprint=fingerprint, lease=lease, worker=worker, now=now)
    if record.operation != operation or record.fingerprint != fingerprint:
        return Mismatch(record)
    if record.status == RecordStatus.COMPLETED:
        IdempotencyRecord.objects.filter(pk=record.pk).update(replay_count=F("replay_count") + 1)
        record.replay_count += 1
        return Replay(record)
    if record.status == RecordStatus.PROCESSING:
        from .liveness import holder_gone  # PostgreSQL: the holder's session advisory lock

        gone = False
        if record.lease_expires_at is not None and record.lease_expires_at > now:
            # A live lease, unless the holder's liveness lock says its session ended (it died):
            # then it is superseded at once, just like an expired lease (fencing keeps it safe).
            if not holder_gone(record):
                return InFlight(record, until=record.lease_expires_at)
            gone = True
        # The holder's lease ran out (it died or stalled), or its session ended. Supersede it; if
        # it ever finishes, its completion is fenced because attempt_count moves past its number.
        _attempt_end(
            record_id=record.pk, number=record.attempt_count, status=AttemptStatus.TIMED_OUT, now=now,
            error_type="HolderGone" if gone else "LeaseExpired",
            message="holder's session ended; superseded" if gone
            else f"lease expired at {record.lease_expires_at:%Y-%m-%d %H:%M:%S}; superseded",
        )
        if max_attempts is not None and record.attempt_count >= max_attempts:
            IdempotencyRecord.objects.filter(pk=record.pk, status=RecordStatus.PROCESSING).update(
                status=RecordStatus.FAILED, retry_at=None, lease_expires_at=None, updated_at=now, expires_at=_kept_until(now),
                error_summary=f"gave up: {record.attempt_count} attempts started, the last "
                + ("holder's session ended" if gone else "lease expired"),
            )
            record.refresh_from_db()
            return Failed(record)
    elif record.status == RecordStatus.FAILED:
        if record.retry_at is None:
            return Failed(record)
        if record.retry_at > now:
            return InFlight(record, until=record.retry_at)
    number = record.attempt_count + 1
    IdempotencyRecord.objects.filter(pk=record.pk, attempt_count=record.attempt_count).update(
        status=RecordStatus.PROCESSING, attempt_count=number, lease_expires_at=now + lease,
        retry_at=None, updated_at=now,
    )
    record.status, record.attempt_count, record.lease_expires_at, record.retry_at = (
        RecordStatus.PROCESSING, number, now + lease, None,
    )
    attempt = Attempt.objects.create(record=record, number=number, worker=worker, started_at=now)
    return Claimed(attempt)


def _claim_forgotten(
    record: IdempotencyRecord, *, operation: str, fingerprint: str, lease: timedelta, worker: str, now: datetime
) -> ClaimOutcome:
    """A claim of a key the purge forgot (its key retention ran out): the key is new again, as an
    expired key is for Stripe and the IETF draft (same key after 24 h: the request runs again,
    whatever its body). The row is kept rather than inserted afresh so that attempt numbers go on
    (the fencing token stays monotonic: a straggler of the old life can never match the new
    holder) and the old attempts stay linked to the key as history.

    Runs under the record's row lock (``claim``). Only a retry an operator scheduled in the
    future on the forgotten key (``reopen(now=later)``) still waits: that is live work.
    """
    if record.status == RecordStatus.FAILED and record.retry_at is not None and record.retry_at > now:
        return InFlight(record, until=record.retry_at)
    number = record.attempt_count + 1
    # Conditional on the row still being forgotten at this count: under the row lock this always
    # matches; were it ever not, the key moved and the caller's next claim decides afresh.
    moved = IdempotencyRecord.objects.filter(
        pk=record.pk, attempt_count=record.attempt_count, forgotten_at__isnull=False,
        status__in=[RecordStatus.COMPLETED, RecordStatus.FAILED],
    ).update(
        operation=operation, fingerprint=fingerprint, status=RecordStatus.PROCESSING, attempt_count=number,
        lease_expires_at=now + lease, retry_at=None, result=None, completed_at=None, error_summary="",
        forgotten_at=None, updated_at=now, expires_at=now + _retention(),
        # replay_count is kept: it is a counter (the replays metric), and it never goes backwards.
    )
    if not moved:
        return InFlight(record, until=now)
    record.operation, record.fingerprint, record.status, record.attempt_count = operation, fingerprint, RecordStatus.PROCESSING, number
    record.lease_expires_at, record.retry_at, record.result, record.completed_at = now + lease, None, None, None
    record.error_summary, record.forgotten_at, record.expires_at = "", None, now + _retention()
    attempt = Attempt.objects.create(record=record, number=number, worker=worker, started_at=now)
    return Claimed(attempt)


# --- moves of a running attempt -----------------------------------------------------------------


def _held_by(attempt: Attempt):
    """The record, filtered to match only while ``attempt`` still holds the key.

    The attempt's own row must belong to the record too: should a record id ever be handed out
    again (a claim committed asynchronously and lost in a database crash), a stale attempt
    carrying that id and number 1 must not move another key's record.
    """
    return IdempotencyRecord.objects.filter(
        Exists(Attempt.objects.filter(pk=attempt.pk, record_id=OuterRef("pk"))),
        pk=attempt.record_id, status=RecordStatus.PROCESSING, attempt_count=attempt.number,
    )


def heartbeat(*, attempt: Attempt, lease_seconds: float | None = None, now: datetime | None = None) -> bool:
    """Extend the lease of a running attempt. False means the attempt was superseded: stop.

    The new lease is the database's time plus ``lease_seconds`` (``now`` only in tests).
    """
    lease = timedelta(seconds=lease_seconds if lease_seconds is not None else conf.get("LEASE_SECONDS"))
    at = db_now_expression() if now is None else Value(now)
    with transaction.atomic():
        held = _held_by(attempt).update(lease_expires_at=_plus(at, lease), updated_at=at)
        if held:
            Attempt.objects.filter(pk=attempt.pk, status=AttemptStatus.RUNNING).update(heartbeat_at=at)
    return bool(held)


def _plus(at, delta: timedelta):
    """``at + delta`` as a database expression (the database's clock when ``at`` is Now())."""
    return ExpressionWrapper(at + Value(delta), output_field=DateTimeField())


class _NotHolder(Exception):
    pass


def complete(
    *,
    attempt: Attempt,
    result: Any,
    write: Callable[[], Any] | None = None,
    details: dict | None = None,
    now: datetime | None = None,
) -> Completion:
    """Complete the key with ``result``, and run ``write`` (the domain write) in the same transaction.

    The record moves to COMPLETED only where ``status = PROCESSING and attempt_count =
    attempt.number``. If no row matches, a newer attempt owns the key: the domain write is rolled
    back, the attempt is marked FENCED and the winner's result is returned. An attempt whose lease
    expired but that nobody superseded still holds the key and may complete.

    Call it outside any transaction (its atomic block is then the whole commit). Raises whatever
    ``write`` raises, except an ``IntegrityError`` caused by a winner's row, which means fenced.
    The times it writes are the database's (``now`` only in tests).
    """
    try:
        # Without a domain write there is nothing to roll back when the key is not ours (the
        # conditional UPDATE wrote nothing): no savepoint inside a caller's transaction (the API's).
        with transaction.atomic(savepoint=write is not None):
            if write is not None:
                write()
            # Last, so the record's row lock is held for the shortest time, and so locks are taken
            # in one order (domain rows, then the key): callers that lock a domain row and then
            # its key (an operator's retry) cannot deadlock with a completing worker.
            held = _complete_held(attempt=attempt, result=result, details=details, now=now)
            if not held and write is not None:
                raise _NotHolder
        if held:
            return Completion(fenced=False, result=result)
        return completion_refused(attempt=attempt, details=details, now=now)
    except _NotHolder:
        return completion_refused(attempt=attempt, details=details, now=now)
    except IntegrityError as exc:
        if _held_by(attempt).exists():
            raise  # a genuine domain error while we hold the key: let the caller fail the attempt
        return completion_refused(attempt=attempt, details=details, now=now, refused_by=exc)


def completion_refused(
    *, attempt: Attempt, details: dict | None, now: datetime | None = None, refused_by: BaseException | None = None
) -> Completion:
    """What a completion whose conditional UPDATE matched nothing (or whose write the database
    refused while the attempt no longer held the key) amounts to, after its transaction was
    rolled back: FENCED with the winner's result, or "already completed by this attempt" when
    its own earlier commit landed unseen. For callers that complete in their own statement
    (``complete_sql``) as much as for ``complete``."""
    now = now or db_now(model=IdempotencyRecord)  # the attempt's ending, in the database's time
    reason = (
        f"finished late; the database refused its write ({type(refused_by).__name__})" if refused_by is not None
        else "finished after a newer attempt took the key; its write was rolled back"
    )
    winner = IdempotencyRecord.objects.only("status", "result", "attempt_count").filter(pk=attempt.record_id).first()
    if winner is None:
        # The record was purged (or deleted by an operator) under the running attempt: nothing
        # holds the key, and this attempt certainly does not.
        reason = "finished after its key's record was deleted; its write was rolled back"
        _attempt_end(attempt_id=attempt.pk, status=AttemptStatus.FENCED, now=now, error_type="Fenced", message=reason, details=details)
        return Completion(fenced=True, result=None, reason=reason)
    if winner.status == RecordStatus.COMPLETED and winner.attempt_count == attempt.number:
        # This very attempt completed the key before (say its first call committed but the
        # answer was lost): completing again is a replay of its own result, not a fencing.
        return Completion(fenced=False, result=winner.result, reason="already completed by this attempt")
    _attempt_end(
        attempt_id=attempt.pk, status=AttemptStatus.FENCED, now=now,
        error_type="Fenced", message=reason, details=details,
    )
    return Completion(fenced=True, result=winner.result if winner.status == RecordStatus.COMPLETED else None, reason=reason)


def held_by(attempt: Attempt) -> bool:
    """Whether ``attempt`` holds its key right now (PROCESSING under its number)."""
    return _held_by(attempt).exists()


def fail(
    *,
    attempt: Attempt,
    error: BaseException,
    policy: RetryPolicy = NO_RETRY,
    outcome_unknown: bool = False,
    details: dict | None = None,
    now: datetime | None = None,
    on_failed: Callable[[FailureOutcome], Any] | None = None,
) -> FailureOutcome:
    """Record ``error`` (type, message, traceback) on the attempt and decide what comes next.

    ``outcome_unknown``: the external call timed out and may have happened; the attempt ends as
    UNKNOWN, not FAILED. The policy then decides between a retry at ``retry_at`` (the record
    waits as FAILED with a retry time) and a terminal FAILED; an infrastructure error (see
    ``idempotency.faults``) is always retried. If the attempt had already lost the key, only its
    own row is written.

    ``on_failed(outcome)`` runs in the same transaction, only while this attempt held the key, so
    the caller's own move (its step's RETRY_WAIT or FAILED) commits with the key's, or neither
    does; nobody can claim in between. Lock the caller's rows before calling (the lock order).
    ``retry_at`` is in the database's time (``now`` only in tests).
    """
    delay = policy.retry_delay(attempt_number=attempt.number, error=error)
    status = AttemptStatus.UNKNOWN if outcome_unknown else AttemptStatus.FAILED
    summary = _one_line(error)
    with transaction.atomic():
        now = now or db_now(model=IdempotencyRecord)
        retry_at = None if delay is None else now + timedelta(seconds=delay)
        held = _held_by(attempt).update(
            status=RecordStatus.FAILED, retry_at=retry_at, lease_expires_at=None, error_summary=summary, updated_at=now,
            # A whole retention past the failure (or its retry), whatever the first expiry said.
            expires_at=_kept_until(retry_at or now),
        )
        _attempt_end(
            attempt_id=attempt.pk, status=status, now=now, error_type=type(error).__name__,
            message=str(error), traceback="".join(traceback_module.format_exception(error)), details=details,
        )
        outcome = FailureOutcome(retry_at=retry_at if held else None, held=bool(held))
        if held and on_failed is not None:
            on_failed(outcome)
    return outcome


# --- operators' moves ---------------------------------------------------------------------------


def release(*, record: IdempotencyRecord, reason: str, now: datetime | None = None) -> bool:
    """Take the key away from its running attempt (a stuck lease, or a forced retry).

    The record becomes FAILED with a retry due now; the running attempt is marked TIMED_OUT and,
    should it ever finish, is fenced. False if the record was not PROCESSING.
    """
    with transaction.atomic():
        now = now or db_now(model=IdempotencyRecord)
        locked = IdempotencyRecord.objects.select_for_update().filter(pk=record.pk, status=RecordStatus.PROCESSING).first()
        if locked is None:
            return False
        IdempotencyRecord.objects.filter(pk=locked.pk).update(
            status=RecordStatus.FAILED, retry_at=now, lease_expires_at=None,
            error_summary=f"released by an operator: {reason}"[:500], updated_at=now, expires_at=_kept_until(now),
        )
        _attempt_end(
            record_id=locked.pk, number=locked.attempt_count, status=AttemptStatus.TIMED_OUT, now=now,
            error_type="Released", message=f"released by an operator: {reason}",
        )
    return True


def reopen(*, record: IdempotencyRecord, now: datetime | None = None) -> bool:
    """Allow a new attempt on a FAILED key at ``now`` (default: at once, in the database's time;
    an operator's retry). False if not FAILED."""
    at = now or db_now(model=IdempotencyRecord)
    return bool(
        IdempotencyRecord.objects.filter(pk=record.pk, status=RecordStatus.FAILED).update(
            retry_at=at, updated_at=at, expires_at=_kept_until(at),  # reopened work is live work
        )
    )


# --- helpers ------------------------------------------------------------------------------------


def _retention() -> timedelta:
    return timedelta(hours=conf.get("RETENTION_HOURS"))


def _kept_until(moment: datetime):
    """``expires_at`` for a record that left PROCESSING (or was reopened) at ``moment``: a whole
    retention past it, never earlier than it was. PROCESSING itself is never purged, so every way
    out of it (complete, fail, release, dead-letter) and ``reopen`` set it; a takeover need not."""
    return Greatest(F("expires_at"), Value(moment + _retention()))


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
    return text[:500]


def _attempt_end(
    *,
    status: str,
    now: datetime,
    attempt_id=None,
    record_id=None,
    number: int | None = None,
    error_type: str = "",
    message: str = "",
    traceback: str = "",
    details: dict | None = None,
) -> int:
    """Move one attempt to ``status`` if the state table allows it from where it is."""
    rows = Attempt.objects.filter(pk=attempt_id) if attempt_id is not None else Attempt.objects.filter(record_id=record_id, number=number)
    changes: dict[str, Any] = {"status": status, "finished_at": now}
    if error_type or message:
        changes.update(error_type=error_type[:200], error_message=message, traceback=traceback)
    if details:
        changes["details"] = details
    return rows.filter(status__in=attempt_sources(status)).update(**changes)


# --- the happy path's statements ----------------------------------------------------------------
#
# The happy path (a new key, then its completion) is what every guarded operation pays, so it is
# kept to two commits, with statements written once from the models' metadata instead of being
# compiled by the ORM on every call:
#   claim:    PostgreSQL: one INSERT that writes the record and attempt #1 (a data-modifying CTE),
#             sent in autocommit mode: one round trip, one commit, no BEGIN/COMMIT of its own.
#             SQLite: the two INSERTs in one transaction.
#   complete: one UPDATE that moves the record to COMPLETED *only where* it is PROCESSING with
#             ``attempt_count = number`` and (PostgreSQL: in the same statement) the attempt to
#             SUCCEEDED; then the caller's domain write; then the commit.
# The protocol is the one the ORM path (kept for other databases) follows: the unique constraint on
# (scope, key) decides the claim (a unique violation fails the insert as a whole), and the
# completion is one conditional UPDATE whose row count says whether the attempt held the key.

_FAST_VENDORS = frozenset({"postgresql", "sqlite"})


def _db_for(model):
    return connections[router.db_for_write(model)]


_INSERT_PARTS: dict[tuple, tuple[list, str, str]] = {}

# PostgreSQL: time columns the database fills from its own clock (``idempotency.clock``).
_PG_NOW, _PG_NOW_PLUS = "statement_timestamp()", "statement_timestamp() + make_interval(secs => %s)"


def _insert_parts(connection, model, skip: tuple[str, ...], db_clock: tuple[tuple[str, bool], ...] = ()) -> tuple[list, str, str]:
    # Built once per database vendor, model and clock shape: the SQL text never changes between calls.
    cache_key = (connection.vendor, model, skip, db_clock)
    if cache_key not in _INSERT_PARTS:
        timed = dict(db_clock)
        fields = [f for f in model._meta.concrete_fields if not (f.primary_key and f.auto_created) and f.attname not in skip]
        columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
        placeholders = ", ".join(
            (_PG_NOW_PLUS if timed[f.attname] else _PG_NOW) if f.attname in timed else "%s" for f in fields
        )
        _INSERT_PARTS[cache_key] = fields, columns, placeholders
    return _INSERT_PARTS[cache_key]


def _insert_statement(
    connection, model, instance, *, skip: tuple[str, ...] = (), db_clock: dict[str, float | None] | None = None
) -> tuple[str, str, list]:
    """Column list, placeholders and adapted values for inserting ``instance`` (auto fields run).

    ``db_clock`` (PostgreSQL): attname -> seconds after the database's now (None: now itself);
    those columns are computed by the database instead of sent.
    """
    shape = tuple((name, offset is not None) for name, offset in (db_clock or {}).items())
    fields, columns, placeholders = _insert_parts(connection, model, skip, shape)
    values = []
    for f in fields:
        if db_clock and f.attname in db_clock:
            if db_clock[f.attname] is not None:
                values.append(db_clock[f.attname])
        else:
            values.append(f.get_db_prep_save(f.pre_save(instance, add=True), connection))
    return columns, placeholders, values


def _mark_saved(connection, *instances) -> None:
    for instance in instances:
        instance._state.adding, instance._state.db = False, connection.alias


def _stamp_new(record: IdempotencyRecord, attempt: Attempt, *, now: datetime, lease: timedelta) -> None:
    record.created_at = record.updated_at = attempt.started_at = now
    record.lease_expires_at, record.expires_at = now + lease, now + _retention()


def _insert_new(
    record: IdempotencyRecord, attempt: Attempt, *, lease: timedelta, now: datetime | None, savepoint: bool = True
) -> None:
    """Insert a new key's record and its attempt #1 atomically. Raises IntegrityError if the key exists.

    The lease starts at ``now``; None means the database's clock (on PostgreSQL the statement
    itself computes the time columns; SQLite's clock is this host's).
    ``savepoint=False`` (SQLite): the caller's atomic block is rolled back on a unique violation
    anyway. PostgreSQL needs none: its insert does nothing on a conflict, and we raise."""
    connection = _db_for(IdempotencyRecord)
    if connection.vendor not in _FAST_VENDORS:
        _stamp_new(record, attempt, now=now or db_now(using=connection.alias), lease=lease)
        with transaction.atomic(using=connection.alias):
            record.save(force_insert=True, using=connection.alias)
            attempt.record = record
            attempt.save(force_insert=True, using=connection.alias)
        return
    qn = connection.ops.quote_name
    record_table, attempt_table = qn(IdempotencyRecord._meta.db_table), qn(Attempt._meta.db_table)
    record_pk, record_fk = qn(IdempotencyRecord._meta.pk.column), qn(Attempt._meta.get_field("record").column)
    if connection.vendor == "postgresql":
        record_clock = attempt_clock = None
        if now is None:
            record_clock = {
                "created_at": None, "updated_at": None,
                "lease_expires_at": lease.total_seconds(), "expires_at": _retention().total_seconds(),
            }
            attempt_clock = {"started_at": None}
        else:
            _stamp_new(record, attempt, now=now, lease=lease)
        columns, placeholders, values = _insert_statement(connection, IdempotencyRecord, record, db_clock=record_clock)
        a_columns, a_placeholders, a_values = _insert_statement(
            connection, Attempt, attempt, skip=("record_id",), db_clock=attempt_clock
        )
        # ON CONFLICT DO NOTHING: an existing key inserts nothing and raises nothing, so no
        # savepoint is needed inside a caller's transaction (none is poisoned); we raise below.
        sql = (
            f"WITH new_record AS (INSERT INTO {record_table} ({columns}) VALUES ({placeholders}) "
            f"ON CONFLICT ({qn('scope')}, {qn('key')}) DO NOTHING RETURNING {record_pk}) "
            f"INSERT INTO {attempt_table} ({a_columns}, {record_fk}) SELECT {a_placeholders}, {record_pk} FROM new_record "
            f"RETURNING {record_fk}, {qn(Attempt._meta.get_field('started_at').column)}"
        )
        # In autocommit the statement is its own transaction (one round trip, one commit).
        with connection.cursor() as cursor:
            cursor.execute(sql, values + a_values)
            row = cursor.fetchone()
        if row is None:
            raise IntegrityError(f"idempotency key {record.scope}/{record.key} exists")
        record.pk, started_at = row
        if now is None:
            _stamp_new(record, attempt, now=started_at, lease=lease)  # the database's time, as written
    else:
        _stamp_new(record, attempt, now=now or timezone.now(), lease=lease)  # SQLite: this host's clock is the database's
        columns, placeholders, values = _insert_statement(connection, IdempotencyRecord, record)
        with transaction.atomic(using=connection.alias, savepoint=savepoint), connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {record_table} ({columns}) VALUES ({placeholders})", values)
            record.pk = cursor.lastrowid
            attempt.record = record
            a_columns, a_placeholders, a_values = _insert_statement(connection, Attempt, attempt)
            cursor.execute(f"INSERT INTO {attempt_table} ({a_columns}) VALUES ({a_placeholders})", a_values)
    attempt.record = record
    _mark_saved(connection, record, attempt)


@dataclass(frozen=True)
class CompletionParts:
    """The two conditional UPDATEs of a completion, as SQL text and parameters, for a caller that
    folds them into a statement of its own (PostgreSQL: a data-modifying CTE). ``held_sql`` moves
    the record only while the attempt holds the key; ``ended_sql`` moves the attempt to SUCCEEDED
    and takes one more condition (``AND ...``) from the caller, normally "held matched"."""

    held_sql: str
    held_params: list
    ended_sql: str
    ended_params: list


# The completion's time columns: on PostgreSQL the statement computes them from the database's
# clock (``statement_timestamp()``), as the claim does, so a worker whose host clock is off
# cannot move a key's expiry (the purge compares it on the database's clock) or its times.
_DB_CLOCK_COLUMNS = {"completed_at": None, "updated_at": None, "finished_at": None, "expires_at": "retention"}


def completion_parts(
    *, attempt: Attempt, result: Any, details: dict | None, now: datetime | None, connection
) -> CompletionParts:
    """The SQL of ``attempt``'s completion with ``result`` (PostgreSQL or SQLite). ``now`` None:
    the database's clock (on SQLite that is this host's); a time only in tests."""
    db_clock = now is None and connection.vendor == "postgresql"
    now = now or timezone.now()
    record_changes: dict[str, Any] = dict(
        status=RecordStatus.COMPLETED, result=result, completed_at=now, lease_expires_at=None,
        retry_at=None, error_summary="", updated_at=now, expires_at=now + _retention(),
    )
    attempt_changes: dict[str, Any] = {"status": AttemptStatus.SUCCEEDED, "finished_at": now}
    if details:
        attempt_changes["details"] = details
    sources = attempt_sources(AttemptStatus.SUCCEEDED)
    held_sql, ended_sql, record_fields, attempt_fields = _completion_statements(
        connection, tuple(record_changes), tuple(attempt_changes), len(sources), db_clock
    )

    def values(fields, changes):
        for f in fields:
            if not (db_clock and f.name in _DB_CLOCK_COLUMNS):
                yield f.get_db_prep_save(changes[f.name], connection)
            elif _DB_CLOCK_COLUMNS[f.name] == "retention":
                yield _retention().total_seconds()

    # The fencing condition: the record moves only while this attempt holds the key.
    attempt_id = Attempt._meta.pk.get_db_prep_value(attempt.pk, connection)
    held_params = [*values(record_fields, record_changes), attempt.record_id, RecordStatus.PROCESSING, attempt.number, attempt_id]
    ended_params = [*values(attempt_fields, attempt_changes), attempt_id, *sources]
    return CompletionParts(held_sql, held_params, ended_sql, ended_params)


def _complete_held(*, attempt: Attempt, result: Any, details: dict | None, now: datetime | None) -> bool:
    """Move the record to COMPLETED and the attempt to SUCCEEDED if the attempt holds the key.

    Must run inside the completion's transaction. False (nothing written) if it does not hold it.
    """
    connection = _db_for(IdempotencyRecord)
    if connection.vendor not in _FAST_VENDORS:
        now = now or db_now(using=connection.alias)
        record_changes: dict[str, Any] = dict(
            status=RecordStatus.COMPLETED, result=result, completed_at=now, lease_expires_at=None,
            retry_at=None, error_summary="", updated_at=now, expires_at=now + _retention(),
        )
        if not _held_by(attempt).update(**record_changes):
            return False
        Attempt.objects.filter(pk=attempt.pk, status__in=attempt_sources(AttemptStatus.SUCCEEDED)).update(
            status=AttemptStatus.SUCCEEDED, finished_at=now, **({"details": details} if details else {})
        )
        return True
    parts = completion_parts(attempt=attempt, result=result, details=details, now=now, connection=connection)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"WITH held AS ({parts.held_sql} RETURNING 1), "
                f"ended AS ({parts.ended_sql} AND EXISTS (SELECT 1 FROM held) RETURNING 1) "
                f"SELECT (SELECT count(*) FROM held)",
                parts.held_params + parts.ended_params,
            )
            return bool(cursor.fetchone()[0])
        cursor.execute(parts.held_sql, parts.held_params)
        if cursor.rowcount != 1:
            return False
        cursor.execute(parts.ended_sql, parts.ended_params)
        return True


@dataclass(frozen=True)
class NewKeyParts:
    """A new key's record and attempt #1 as two INSERT bodies (PostgreSQL), for a caller that
    folds the claim into a statement of its own: ``record_sql`` inserts the record from
    ``SELECT ... FROM {source}`` and does nothing on a conflict (the key exists: the caller then
    takes the locked path, ``claim``); ``attempt_sql`` inserts attempt #1 from ``{record}``.
    Call ``claimed(record_id, started_at)`` with what the statement returned."""

    record_sql: str
    record_params: list
    attempt_sql: str
    attempt_params: list
    record: IdempotencyRecord
    attempt: Attempt
    lease: timedelta

    def claimed(self, record_id: int, started_at: datetime) -> Claimed:
        self.record.pk = record_id
        self.attempt.record = self.record
        _stamp_new(self.record, self.attempt, now=started_at, lease=self.lease)
        _mark_saved(_db_for(IdempotencyRecord), self.record, self.attempt)
        return Claimed(self.attempt)


def new_key_parts(
    *, scope: str, key: str, operation: str, fingerprint: str, lease_seconds: float | None = None,
    worker: str | None = None, source: str, record: str,
) -> NewKeyParts:
    """The SQL of claiming a new key (PostgreSQL), every time column on the database's clock.
    ``source``/``record``: the CTE names the caller's statement reads from."""
    connection = _db_for(IdempotencyRecord)
    lease = timedelta(seconds=lease_seconds if lease_seconds is not None else conf.get("LEASE_SECONDS"))
    new_record = IdempotencyRecord(
        scope=scope, key=key, operation=operation, fingerprint=fingerprint, status=RecordStatus.PROCESSING, attempt_count=1,
    )
    attempt = Attempt(record=new_record, number=1, worker=worker or default_worker())
    qn = connection.ops.quote_name
    columns, placeholders, values = _insert_statement(connection, IdempotencyRecord, new_record, db_clock={
        "created_at": None, "updated_at": None,
        "lease_expires_at": lease.total_seconds(), "expires_at": _retention().total_seconds(),
    })
    a_columns, a_placeholders, a_values = _insert_statement(
        connection, Attempt, attempt, skip=("record_id",), db_clock={"started_at": None}
    )
    record_pk, record_fk = qn(IdempotencyRecord._meta.pk.column), qn(Attempt._meta.get_field("record").column)
    return NewKeyParts(
        record_sql=(
            f"INSERT INTO {qn(IdempotencyRecord._meta.db_table)} ({columns}) SELECT {placeholders} FROM {source} "
            f"ON CONFLICT ({qn('scope')}, {qn('key')}) DO NOTHING RETURNING {record_pk}"
        ),
        record_params=values,
        attempt_sql=(
            f"INSERT INTO {qn(Attempt._meta.db_table)} ({a_columns}, {record_fk}) SELECT {a_placeholders}, {record_pk} "
            f"FROM {record} RETURNING {record_fk}, {qn(Attempt._meta.get_field('started_at').column)}"
        ),
        attempt_params=a_values,
        record=new_record, attempt=attempt, lease=lease,
    )


_COMPLETION_STATEMENTS: dict[tuple, tuple[str, str, list, list]] = {}


def _completion_statements(connection, record_names: tuple, attempt_names: tuple, source_count: int, db_clock: bool = False):
    """The two conditional UPDATEs of a completion (SQL text and fields), built once per shape.
    ``db_clock``: the time columns are the statement's own clock (``_DB_CLOCK_COLUMNS``)."""
    cache_key = (connection.vendor, record_names, attempt_names, source_count, db_clock)
    if cache_key in _COMPLETION_STATEMENTS:
        return _COMPLETION_STATEMENTS[cache_key]
    qn = connection.ops.quote_name

    def col(model, name):
        return qn(model._meta.get_field(name).column)

    record_fields = [IdempotencyRecord._meta.get_field(name) for name in record_names]
    attempt_fields = [Attempt._meta.get_field(name) for name in attempt_names]

    def assignments(fields) -> str:
        def value(f) -> str:
            if not (db_clock and f.name in _DB_CLOCK_COLUMNS):
                return "%s"
            return _PG_NOW_PLUS if _DB_CLOCK_COLUMNS[f.name] == "retention" else _PG_NOW
        return ", ".join(f"{qn(f.column)} = {value(f)}" for f in fields)

    held_sql = (
        f"UPDATE {qn(IdempotencyRecord._meta.db_table)} SET {assignments(record_fields)} "
        f"WHERE {col(IdempotencyRecord, 'id')} = %s AND {col(IdempotencyRecord, 'status')} = %s "
        f"AND {col(IdempotencyRecord, 'attempt_count')} = %s "
        # The attempt's own row must belong to this record (see ``_held_by``).
        f"AND EXISTS (SELECT 1 FROM {qn(Attempt._meta.db_table)} WHERE {col(Attempt, 'id')} = %s "
        f"AND {col(Attempt, 'record')} = {qn(IdempotencyRecord._meta.db_table)}.{col(IdempotencyRecord, 'id')})"
    )
    ended_sql = (
        f"UPDATE {qn(Attempt._meta.db_table)} SET {assignments(attempt_fields)} "
        f"WHERE {col(Attempt, 'id')} = %s AND {col(Attempt, 'status')} IN ({', '.join(['%s'] * source_count)})"
    )
    _COMPLETION_STATEMENTS[cache_key] = held_sql, ended_sql, record_fields, attempt_fields
    return _COMPLETION_STATEMENTS[cache_key]
