"""The reconciler: finds step runs that should be moving and are not, and enqueues them again.

Three kinds, each bounded per pass:

* **due retries**: RETRY_WAIT with ``next_attempt_at <= now`` (django-q2 has no delayed enqueue,
  so a failed attempt's retry waits here);
* **expired leases**: RUNNING/QUEUED steps whose record is PROCESSING with a lease that ran out
  (the worker died or stalled; the next claim supersedes it), or RUNNING steps whose record
  already FAILED, with a due retry or for good (a crash between the guard's ``fail`` and the
  step's move);
* **lost messages**: QUEUED for longer than a grace period with no task on the broker (ORM
  broker: no ``OrmQ`` row names it; Redis: no message in the list names it). Re-sending only
  those keeps one outstanding message per step: judging by age alone flooded a long Redis queue
  with copies of messages that were only waiting.

Every re-enqueue is a conditional UPDATE on the row's ``(status, enqueued_at)`` as read, with the
enqueue in the same transaction: two reconcilers racing send once. A duplicate that slips through
anyway (a task already on its way) is harmless: the guard makes the second run a no-op.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from idempotency.clock import db_now
from idempotency.states import RecordStatus

from .models import StepRun
from .queueing import step_run_enqueue, uses_transactional_broker
from .states import InputStatus, StepStatus

log = logging.getLogger(__name__)

# Decoding queue rows costs an unpickle each; past this many the lost check trusts age alone.
MAX_QUEUE_ROWS_SCANNED = 20_000


@dataclass
class ReconcileReport:
    now: datetime
    dry_run: bool = False
    due_retries: list[int] = field(default_factory=list)
    expired_leases: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    skipped_races: int = 0
    queue_rows_scanned: int = 0
    notes: list[str] = field(default_factory=list)
    bulk_actions: list[int] = field(default_factory=list)  # background operator actions re-sent

    @property
    def enqueued(self) -> int:
        return len(self.due_retries) + len(self.expired_leases) + len(self.lost)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["now"] = self.now.isoformat()
        data["enqueued"] = self.enqueued
        return data

    def summary(self) -> str:
        verb = "would re-enqueue" if self.dry_run else "re-enqueued"
        return (
            f"{verb} {self.enqueued} step run(s): {len(self.due_retries)} due retries, "
            f"{len(self.expired_leases)} expired leases, {len(self.lost)} lost messages"
            + (f"; {self.skipped_races} taken by a concurrent reconciler or worker" if self.skipped_races else "")
            + (f"; {len(self.bulk_actions)} stalled background action(s) re-sent" if self.bulk_actions else "")
        )


def queued_step_run_ids(*, limit: int = MAX_QUEUE_ROWS_SCANNED) -> set[int] | None:
    """Ids of the step runs that have a task on the broker.

    ORM broker: every ``OrmQ`` row (waiting, prefetched or running: a row is deleted at its ack).
    Redis: every message still in the list (a message a cluster has popped is not there any more:
    its step is claimed within a task or two, inside the lost grace). None when more than
    ``limit`` messages wait: the lost check then trusts age alone.
    """
    payloads = _broker_payloads(limit=limit)
    if payloads is None:
        return None
    from django_q.signing import SignedPackage

    ids: set[int] = set()
    for payload in payloads:
        try:
            task = SignedPackage.loads(payload)
        except Exception:  # noqa: BLE001 - a message of another project or key: not ours
            continue
        name = str(task.get("name") or "")
        if name.startswith("step_run:"):
            try:
                ids.add(int(name.split(":", 1)[1]))
            except ValueError:
                pass
    return ids


def _broker_payloads(*, limit: int) -> list | None:
    if uses_transactional_broker():
        from django_q.conf import Conf
        from django_q.models import OrmQ

        rows = list(OrmQ.objects.using(Conf.ORM).filter(key=Conf.PREFIX).values_list("payload", flat=True)[: limit + 1])
        return None if len(rows) > limit else rows
    import redis

    from .queueing import process_broker

    broker = process_broker()
    try:
        payloads = broker.connection.lrange(broker.list_key, 0, limit)  # one round trip; nothing is popped
    except redis.RedisError as exc:
        raise QueueUnreadable(f"{type(exc).__name__}: {exc}") from exc
    return None if len(payloads) > limit else payloads


class QueueUnreadable(Exception):
    """The broker could not be read (Redis down or unreachable): whether a message is lost
    cannot be told, so the lost check waits for a pass that can read it."""


def _requeue(*, step_run: dict, now: datetime, dry_run: bool) -> bool:
    """Conditionally move one step run to QUEUED (refreshing ``enqueued_at``) and enqueue it."""
    if dry_run:
        return True
    match = Q(pk=step_run["pk"], status=step_run["status"])
    match &= Q(enqueued_at__isnull=True) if step_run["enqueued_at"] is None else Q(enqueued_at=step_run["enqueued_at"])
    with transaction.atomic():
        moved = StepRun.objects.filter(match).exclude(input__status=InputStatus.CANCELLED).update(
            status=StepStatus.QUEUED, enqueued_at=now, updated_at=now
        )
        if moved:
            step_run_enqueue(step_run_id=step_run["pk"])
    return bool(moved)


def reconcile_once(
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    lost_grace_seconds: float | None = None,
) -> ReconcileReport:
    """One pass over the three kinds; returns what it re-enqueued (or would, with ``dry_run``).

    ``limit`` bounds each kind per pass (default ``RECONCILER_BATCH_SIZE``); ``lost_grace_seconds``
    (default ``RECONCILER_LOST_GRACE_SECONDS``) is how long a QUEUED step may go without a
    visible task, and also how soon an expired-lease step may be re-sent after its last enqueue.
    Raises only on database errors.
    """
    # The database's clock judges leases, due retries and staleness: hosts' clocks disagree.
    now = now or db_now(model=StepRun)
    limit = limit or settings.RECONCILER_BATCH_SIZE
    grace = timedelta(seconds=settings.RECONCILER_LOST_GRACE_SECONDS if lost_grace_seconds is None else lost_grace_seconds)
    report = ReconcileReport(now=now, dry_run=dry_run)
    fields = ("pk", "status", "enqueued_at")
    live = StepRun.objects.exclude(input__status=InputStatus.CANCELLED)
    settled = Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=now - grace)

    for row in live.due_for_retry(now=now).order_by("next_attempt_at").values(*fields)[:limit]:
        _take(report, report.due_retries, row, now=now, dry_run=dry_run)

    expired = live.filter(settled).filter(
        Q(status__in=[StepStatus.RUNNING, StepStatus.QUEUED],
          idempotency_record__status=RecordStatus.PROCESSING, idempotency_record__lease_expires_at__lt=now)
        # A crash between the guard's fail() and the step's own move leaves it RUNNING on a
        # FAILED record: a new task either retries it (retry due) or marks it FAILED (terminal).
        | Q(status=StepStatus.RUNNING, idempotency_record__status=RecordStatus.FAILED)
        & (Q(idempotency_record__retry_at__lte=now) | Q(idempotency_record__retry_at__isnull=True))
        # A RUNNING step whose key is gone (deleted by hand, or purged by an older release):
        # nothing holds it, so nothing would ever finish it. A new task claims the key afresh.
        | Q(status=StepStatus.RUNNING, idempotency_record__isnull=True)
    )
    for row in expired.order_by("enqueued_at").values(*fields)[:limit]:
        _take(report, report.expired_leases, row, now=now, dry_run=dry_run)

    candidates = list(
        live.filter(status=StepStatus.QUEUED, enqueued_at__lt=now - grace)
        .exclude(pk__in=report.expired_leases)
        .order_by("enqueued_at").values(*fields)[:limit]
    )
    if candidates:
        try:
            on_queue = queued_step_run_ids()
        except QueueUnreadable as exc:
            # Judging by age alone now would re-send every waiting message once the broker is
            # back: a flood. Nothing is lost by waiting for the next pass.
            report.notes.append(f"queue unreadable ({exc}): lost messages not judged this pass")
            candidates = []
            on_queue = set()
        if on_queue is None:
            report.notes.append("queue too long to inspect: lost messages judged by age alone")
        for row in candidates:
            if on_queue is not None and row["pk"] in on_queue:
                continue  # its task is waiting, prefetched or running: not lost
            _take(report, report.lost, row, now=now, dry_run=dry_run)
    report.bulk_actions = _stalled_bulk_actions_resend(now=now, dry_run=dry_run)
    if report.enqueued or report.bulk_actions:
        log.info("reconciler: %s", report.summary())
    return report


def _stalled_bulk_actions_resend(*, now: datetime, dry_run: bool) -> list[int]:
    """Background operator actions that stopped moving (their task was lost, or its worker
    died): queue their next slice again, each once (conditional on the progress time as read)."""
    from .models import BulkAction
    from .queueing import bulk_action_enqueue

    stall = timedelta(seconds=settings.PIPELINE_OPS_BULK_STALL_SECONDS)
    stalled = BulkAction.objects.filter(
        status__in=[BulkAction.Status.QUEUED, BulkAction.Status.RUNNING], updated_at__lt=now - stall
    )
    sent = []
    for pk in stalled.values_list("pk", flat=True)[:100]:
        if dry_run:
            sent.append(pk)
            continue
        with transaction.atomic():
            # Still stalled as this UPDATE sees it: of two reconcilers, one sends.
            if stalled.filter(pk=pk).update(updated_at=now):
                bulk_action_enqueue(bulk_id=pk)
                sent.append(pk)
    return sent


def _take(report: ReconcileReport, bucket: list[int], row: dict, *, now: datetime, dry_run: bool) -> None:
    if _requeue(step_run=row, now=now, dry_run=dry_run):
        bucket.append(row["pk"])
    else:
        report.skipped_races += 1  # another reconciler or a worker moved it first


SCHEDULE_NAME = "pipeline_ops.reconcile"
SCHEDULE_FUNC = "pipeline_ops.tasks.reconcile_task"


def reconcile_schedule_install() -> bool:
    """Make sure exactly one django-q2 schedule runs the reconciler every minute.

    The migration ``0002_reconciler_schedule`` calls the same logic; this is for databases whose
    schedule an operator deleted. Returns True if it had to create it.
    """
    from django_q.models import Schedule

    with transaction.atomic():
        existing = list(Schedule.objects.select_for_update().filter(name=SCHEDULE_NAME).order_by("pk"))
        for extra in existing[1:]:
            extra.delete()
        if existing:
            Schedule.objects.filter(pk=existing[0].pk).update(
                func=SCHEDULE_FUNC, schedule_type=Schedule.MINUTES, minutes=1, repeats=-1
            )
            return False
        Schedule.objects.create(name=SCHEDULE_NAME, func=SCHEDULE_FUNC, schedule_type=Schedule.MINUTES, minutes=1, repeats=-1)
        return True
