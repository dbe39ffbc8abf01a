"""Retention: delete finished records past their expiry, in batches; report stuck ones."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Count, F, Q, Sum

from . import conf
from .clock import db_now
from .models import Attempt, IdempotencyRecord, PurgedTally
from .states import RecordStatus


@dataclass
class PurgeReport:
    deleted: int = 0
    candidates: int = 0
    stuck: int = 0
    stuck_examples: list[str] = field(default_factory=list)


def records_purgeable(*, now: datetime, older_than_hours: float | None = None):
    """Records safe to delete: COMPLETED or FAILED past retention (a pending retry counts as
    activity: ``fail`` keeps the record a retention period beyond its retry time).

    PROCESSING records are never returned, whatever their age: a live lease means work is running,
    and an expired one means a stuck attempt that a person should see (``records_stuck``).
    """
    # A failed key with a retry scheduled is live work, however old: it is purged only when its
    # retry fell due a whole retention period ago and nobody came back for it.
    retry_pending = Q(status=RecordStatus.FAILED, retry_at__gte=now - timedelta(hours=conf.get("RETENTION_HOURS")))
    if older_than_hours is None:
        return IdempotencyRecord.objects.expired(now=now).exclude(retry_pending)
    cutoff = now - timedelta(hours=older_than_hours)
    return IdempotencyRecord.objects.filter(updated_at__lt=cutoff).filter(
        Q(status=RecordStatus.COMPLETED) | Q(status=RecordStatus.FAILED) & (Q(retry_at__isnull=True) | Q(retry_at__lt=cutoff))
    ).exclude(retry_pending)


def records_stuck(*, now: datetime):
    return IdempotencyRecord.objects.stuck(now=now).order_by("lease_expires_at")


def records_purge(
    *,
    now: datetime | None = None,
    older_than_hours: float | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PurgeReport:
    """Delete purgeable records (and their attempts) in short batches; count what is stuck."""
    now = now or db_now(model=IdempotencyRecord)  # expiries and leases in the database's time
    batch_size = batch_size or conf.get("PURGE_BATCH_SIZE")
    report = PurgeReport()
    purgeable = records_purgeable(now=now, older_than_hours=older_than_hours)
    report.candidates = purgeable.count() if limit is None else min(limit, purgeable.count())
    stuck = records_stuck(now=now)
    report.stuck = stuck.count()
    report.stuck_examples = [f"{r.scope}/{r.key} (attempt #{r.attempt_count}, lease expired {r.lease_expires_at:%Y-%m-%d %H:%M:%S})" for r in stuck[:5]]
    if dry_run:
        return report
    while limit is None or report.deleted < limit:
        size = batch_size if limit is None else min(batch_size, limit - report.deleted)
        with transaction.atomic():
            # Locked in id order (two purges cannot deadlock); PostgreSQL re-checks the rule on a
            # row changed while it waited, so a record claimed, released or reopened meanwhile
            # is not taken.
            ids = list(records_purgeable(now=now, older_than_hours=older_than_hours).select_for_update()
                       .order_by("pk").values_list("pk", flat=True)[:size])
            if not ids:
                break
            _tally_add(ids)
            deleted = IdempotencyRecord.objects.filter(pk__in=ids).delete()[1].get(IdempotencyRecord._meta.label, 0)
        report.deleted += deleted
        if on_batch:
            on_batch(deleted)
    return report


def _tally_add(record_ids: list) -> None:
    """Add what is about to be deleted to ``PurgedTally``: attempts by status, replays by scope."""
    if not record_ids:
        return
    counts = [("attempts", status, n) for status, n in
              Attempt.objects.filter(record_id__in=record_ids).order_by().values_list("status").annotate(n=Count("pk"))]
    counts += [("replays", scope, n or 0) for scope, n in
               IdempotencyRecord.objects.filter(pk__in=record_ids).order_by().values_list("scope").annotate(n=Sum("replay_count"))]
    for name, label, n in counts:
        PurgedTally.objects.get_or_create(name=name, label=label)  # a label seen once stays, even at 0
        if n:
            PurgedTally.objects.filter(name=name, label=label).update(value=F("value") + n)


def purged_totals(name: str) -> dict[str, int]:
    """What the purge deleted, in all, by label: ``purged_totals("attempts")`` by status,
    ``purged_totals("replays")`` by scope. Add it to the log's own counts for a counter."""
    return dict(PurgedTally.objects.filter(name=name).values_list("label", "value"))
