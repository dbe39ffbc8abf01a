"""Two retentions: forget finished keys past the key retention (their stored result goes, the
record and its attempts stay as history), delete them past the longer history retention; in
batches; report stuck ones."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.utils.module_loading import import_string
from django.db.models import Count, F, Q, Sum

from . import conf
from .clock import db_now
from .models import Attempt, IdempotencyRecord, PurgedTally
from .states import RecordStatus


@dataclass
class PurgeReport:
    """What a purge did, by stage. ``forgotten``/``forget_candidates``: keys past the key
    retention whose stored result was cleared (would be, in a dry run); ``deleted``/``candidates``:
    records deleted with their attempts past the history retention; ``stuck``: PROCESSING records
    whose lease expired, kept for a person."""

    forgotten: int = 0
    forget_candidates: int = 0
    deleted: int = 0
    candidates: int = 0
    stuck: int = 0
    stuck_examples: list[str] = field(default_factory=list)


def _finished_past(*, now: datetime, older_than_hours: float | None, extra_hours: float = 0):
    """COMPLETED or FAILED records a retention past their last move (``expires_at`` is a key
    retention after it; ``extra_hours`` lengthens that), or last changed more than
    ``older_than_hours`` ago. Never live work:

    * PROCESSING records are never returned, whatever their age: a live lease means work is
      running, and an expired one means a stuck attempt that a person should see (``records_stuck``);
    * a failed key with a retry scheduled is live work, however old: it is returned only when its
      retry fell due a whole key retention ago and nobody came back for it (``fail`` and
      ``reopen`` keep ``expires_at`` a retention past the retry time).
    """
    key_hours, _ = conf.retention_hours()
    retry_pending = Q(status=RecordStatus.FAILED, retry_at__gte=now - timedelta(hours=key_hours))
    if older_than_hours is None:
        return IdempotencyRecord.objects.expired(now=now - timedelta(hours=extra_hours)).exclude(retry_pending)
    cutoff = now - timedelta(hours=older_than_hours)
    return IdempotencyRecord.objects.filter(updated_at__lt=cutoff).filter(
        Q(status=RecordStatus.COMPLETED) | Q(status=RecordStatus.FAILED) & (Q(retry_at__isnull=True) | Q(retry_at__lt=cutoff))
    ).exclude(retry_pending)


def records_forgettable(*, now: datetime, older_than_hours: float | None = None):
    """Keys past the key retention that still remember their result (stage 1 of the purge)."""
    return _finished_past(now=now, older_than_hours=older_than_hours).filter(forgotten_at__isnull=True)


def records_purgeable(*, now: datetime, history_older_than_hours: float | None = None):
    """Records past the history retention, safe to delete with their attempts (stage 2): a
    history retention after their last move (by default), or last changed more than
    ``history_older_than_hours`` ago. The same "never live work" rules as the key stage."""
    key_hours, history_hours = conf.retention_hours()
    return _finished_past(now=now, older_than_hours=history_older_than_hours, extra_hours=history_hours - key_hours)


def records_stuck(*, now: datetime):
    return IdempotencyRecord.objects.stuck(now=now).order_by("lease_expires_at")


def records_purge(
    *,
    now: datetime | None = None,
    older_than_hours: float | None = None,
    history_older_than_hours: float | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    keep_record_ids=None,
    on_forget: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PurgeReport:
    """The two retentions, in short batches; count what is stuck.

    1. **History retention**: delete finished records past it, with their attempts, adding what
       goes to ``PurgedTally`` in the delete's transaction (counters never go backwards).
    2. **Key retention**: forget finished keys past it: clear the stored result (the replayed
       response) and set ``forgotten_at``, in one conditional UPDATE that re-checks the rules
       above. The record and its attempts stay as history; the next claim of the key runs anew.

    ``keep_record_ids``: a queryset of record ids the caller still shows as history (e.g. the
    records of step runs that still exist); stage 1 leaves them. None: the ``HISTORY_KEEP``
    setting's function decides, if set. ``limit`` bounds each stage.
    Raises ImproperlyConfigured when the retention settings are inconsistent.
    """
    now = now or db_now(model=IdempotencyRecord)  # expiries and leases in the database's time
    batch_size = batch_size or conf.get("PURGE_BATCH_SIZE")
    if keep_record_ids is None and conf.get("HISTORY_KEEP"):
        # A dotted path, resolved here: this app never imports the project that uses it.
        keep_record_ids = import_string(conf.get("HISTORY_KEEP"))()
    report = PurgeReport()

    def forgettable():
        return records_forgettable(now=now, older_than_hours=older_than_hours)

    def purgeable():
        rows = records_purgeable(now=now, history_older_than_hours=history_older_than_hours)
        return rows if keep_record_ids is None else rows.exclude(pk__in=keep_record_ids)

    report.candidates = _capped(purgeable().count(), limit)
    # Not counting what the history stage deletes first.
    report.forget_candidates = _capped(forgettable().count() - (
        forgettable().filter(pk__in=purgeable().values("pk")).count() if report.candidates else 0), limit)
    stuck = records_stuck(now=now)
    report.stuck = stuck.count()
    report.stuck_examples = [f"{r.scope}/{r.key} (attempt #{r.attempt_count}, lease expired {r.lease_expires_at:%Y-%m-%d %H:%M:%S})" for r in stuck[:5]]
    if dry_run:
        return report

    def forget(ids: list) -> int:
        # The same rules again in the UPDATE itself: a record claimed, released or reopened since
        # the select is not matched (and on PostgreSQL the select's row locks made it wait).
        return forgettable().filter(pk__in=ids).update(result=None, forgotten_at=now)

    def delete(ids: list) -> int:
        _tally_add(ids)
        return IdempotencyRecord.objects.filter(pk__in=ids).delete()[1].get(IdempotencyRecord._meta.label, 0)

    # History first: a record past both retentions is deleted, not first forgotten then deleted.
    report.deleted = _in_batches(purgeable, delete, batch_size=batch_size, limit=limit, on_batch=on_batch)
    report.forgotten = _in_batches(forgettable, forget, batch_size=batch_size, limit=limit, on_batch=on_forget)
    return report


def _capped(count: int, limit: int | None) -> int:
    return count if limit is None else min(limit, count)


def _in_batches(select: Callable, act: Callable[[list], int], *, batch_size: int, limit: int | None,
                on_batch: Callable[[int], None] | None) -> int:
    """``act`` on the rows of ``select()``, one short transaction per batch; returns the total."""
    done = 0
    while limit is None or done < limit:
        size = batch_size if limit is None else min(batch_size, limit - done)
        with transaction.atomic():
            # Locked in id order (two purges cannot deadlock); PostgreSQL re-checks the rule on a
            # row changed while it waited, so a record claimed, released or reopened meanwhile
            # is not taken.
            ids = list(select().select_for_update().order_by("pk").values_list("pk", flat=True)[:size])
            if not ids:
                break
            n = act(ids)
        done += n
        if on_batch:
            on_batch(n)
        if n == 0:
            break  # every row of the batch moved under us: the next purge looks again
    return done


def tally_add(*, counts: list[tuple[str, str, int]]) -> None:
    """Add ``(name, label, n)`` counts to ``PurgedTally``; call it in the transaction of the delete
    it counts (an app that purges its own history rows keeps its counters this way too)."""
    for name, label, n in counts:
        PurgedTally.objects.get_or_create(name=name, label=label)  # a label seen once stays, even at 0
        if n:
            PurgedTally.objects.filter(name=name, label=label).update(value=F("value") + n)


def _tally_add(record_ids: list) -> None:
    """Add what is about to be deleted to ``PurgedTally``: attempts by status, replays by scope."""
    if not record_ids:
        return
    counts = [("attempts", status, n) for status, n in
              Attempt.objects.filter(record_id__in=record_ids).order_by().values_list("status").annotate(n=Count("pk"))]
    counts += [("replays", scope, n or 0) for scope, n in
               IdempotencyRecord.objects.filter(pk__in=record_ids).order_by().values_list("scope").annotate(n=Sum("replay_count"))]
    tally_add(counts=counts)


def purged_totals(name: str) -> dict[str, int]:
    """What the purge deleted, in all, by label: ``purged_totals("attempts")`` by status,
    ``purged_totals("replays")`` by scope. Add it to the log's own counts for a counter."""
    return dict(PurgedTally.objects.filter(name=name).values_list("label", "value"))
