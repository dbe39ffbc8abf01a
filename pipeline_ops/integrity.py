"""verify_integrity: read-only checks of the live database for what must never happen.

Operators can run it in production: it only reads, each check returns at most ``limit`` rows,
and every query is driven by an index (status, lease, unique keys). The checks:

* ``duplicate_outputs``: more than one StepOutput per (input, step) (the unique constraint
  should make this impossible: the check proves it did);
* ``completed_without_output``: a step whose record is COMPLETED but that has no StepOutput;
* ``output_without_completed``: a StepOutput whose attempt's record is not COMPLETED, or whose
  attempt did not succeed (an output whose attempt was purged with its record after the
  retention period is fine: it was checked while it lived);
* ``fenced_output``: a StepOutput written by an attempt marked FENCED (a late write survived);
* ``stuck_inputs``: inputs PENDING/RUNNING for longer than the grace period with no live work
  (no step QUEUED recently or with a task on the ORM queue, RUNNING under a live lease, or
  waiting for a retry that is not long overdue);
* ``stale_records``: records PROCESSING whose lease ran out more than the grace period ago.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Q

from idempotency.clock import db_now
from idempotency.models import IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus

from .models import PipelineInput, StepOutput, StepRun
from .reconciler import queued_step_run_ids
from .states import InputStatus, StepStatus

CHECKS = (
    "duplicate_outputs",
    "completed_without_output",
    "output_without_completed",
    "fenced_output",
    "stuck_inputs",
    "stale_records",
)


@dataclass(frozen=True)
class Violation:
    check: str
    object_id: str
    message: str


@dataclass
class IntegrityReport:
    checked_at: datetime
    grace_seconds: float
    limit: int
    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {name: 0 for name in CHECKS})
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, check: str, object_id, message: str) -> None:
        self.violations.append(Violation(check, str(object_id), message))
        self.counts[check] += 1

    def as_dict(self) -> dict:
        data = asdict(self)
        data["checked_at"] = self.checked_at.isoformat()
        data["ok"] = self.ok
        return data

    def summary(self) -> str:
        if self.ok:
            return "integrity ok: no violations"
        parts = [f"{n} {name}" + ("+" if n >= self.limit else "") for name, n in self.counts.items() if n]
        return f"{len(self.violations)} integrity violation(s): " + ", ".join(parts)


def integrity_check(*, now: datetime | None = None, grace_seconds: float | None = None, limit: int = 100) -> IntegrityReport:
    """Run every check; returns the report (never raises for a violation, only on DB errors).

    On PostgreSQL, called outside a transaction, the checks share one READ ONLY, REPEATABLE READ
    snapshot: the database itself refuses any write, and a pipeline moving on during the checks
    cannot make two of them disagree. (On SQLite a transaction would take the write lock, given
    IMMEDIATE mode, so the checks read in autocommit there.)
    """
    if connection.vendor == "postgresql" and not connection.in_atomic_block:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return _integrity_check(now=now, grace_seconds=grace_seconds, limit=limit)
    return _integrity_check(now=now, grace_seconds=grace_seconds, limit=limit)


def _integrity_check(*, now: datetime | None, grace_seconds: float | None, limit: int) -> IntegrityReport:
    now = now or db_now(model=StepRun)  # leases are judged in the database's time
    grace_seconds = settings.INTEGRITY_GRACE_SECONDS if grace_seconds is None else grace_seconds
    cutoff = now - timedelta(seconds=grace_seconds)
    report = IntegrityReport(checked_at=now, grace_seconds=grace_seconds, limit=limit)

    for row in (
        StepOutput.objects.order_by().values("input_id", "step").annotate(n=Count("id")).filter(n__gt=1)[:limit]
    ):
        report.add("duplicate_outputs", f"{row['input_id']}:{row['step']}", f"{row['n']} outputs for one step")

    for pk, key in (
        StepRun.objects.filter(idempotency_record__status=RecordStatus.COMPLETED, output__isnull=True)
        .values_list("pk", "idempotency_record__key")[:limit]
    ):
        report.add("completed_without_output", pk, f"record {key} is COMPLETED but step run {pk} has no output")

    for pk, key, record_status, attempt_status in (
        StepOutput.objects.filter(attempt__isnull=False)
        .filter(~Q(attempt__record__status=RecordStatus.COMPLETED) | ~Q(attempt__status__in=[AttemptStatus.SUCCEEDED, AttemptStatus.FENCED]))
        .values_list("pk", "attempt__record__key", "attempt__record__status", "attempt__status")[:limit]
    ):
        report.add("output_without_completed", pk, f"output {pk} of {key}: record {record_status}, attempt {attempt_status}")

    for pk, key, number in (
        StepOutput.objects.filter(attempt__status=AttemptStatus.FENCED)
        .values_list("pk", "attempt__record__key", "attempt__number")[:limit]
    ):
        report.add("fenced_output", pk, f"output {pk} of {key} was written by fenced attempt #{number}")

    _stuck_inputs(report, now=now, cutoff=cutoff, limit=limit)

    for pk, scope, key, lease in (
        IdempotencyRecord.objects.filter(status=RecordStatus.PROCESSING, lease_expires_at__lt=cutoff)
        .order_by("lease_expires_at").values_list("pk", "scope", "key", "lease_expires_at")[:limit]
    ):
        report.add("stale_records", pk, f"{scope}/{key} PROCESSING, lease expired at {lease:%Y-%m-%d %H:%M:%S}")
    return report


def _stuck_inputs(report: IntegrityReport, *, now: datetime, cutoff: datetime, limit: int) -> None:
    candidates = list(
        PipelineInput.objects.filter(status__in=[InputStatus.PENDING, InputStatus.RUNNING], created_at__lt=cutoff)
        .order_by("created_at").values_list("pk", flat=True)[: limit * 10]
    )
    if not candidates:
        return
    on_queue = queued_step_run_ids()
    if on_queue is None:
        on_queue = set()
        report.notes.append("queue not inspectable (Redis, or very long): QUEUED steps judged by their age alone")
    steps_of: dict = {}
    for step in (
        StepRun.objects.filter(input_id__in=candidates)
        .select_related("idempotency_record")
        .only("pk", "input_id", "status", "enqueued_at", "next_attempt_at",
              "idempotency_record__status", "idempotency_record__lease_expires_at")
    ):
        steps_of.setdefault(step.input_id, []).append(step)
    found = 0
    for input_id in candidates:
        steps = steps_of.get(input_id, [])
        if any(_is_live(step, now=now, cutoff=cutoff, on_queue=on_queue) for step in steps):
            continue
        states = ", ".join(sorted(f"{s.status}" for s in steps)) or "no steps"
        report.add("stuck_inputs", input_id, f"input {input_id} is not terminal and has no live work (steps: {states})")
        found += 1
        if found >= limit:
            return


def _is_live(step: StepRun, *, now: datetime, cutoff: datetime, on_queue: set[int]) -> bool:
    if step.status == StepStatus.QUEUED:
        return step.pk in on_queue or (step.enqueued_at is not None and step.enqueued_at >= cutoff)
    if step.status == StepStatus.RUNNING:
        record = step.idempotency_record
        return (
            record is not None and record.status == RecordStatus.PROCESSING
            and record.lease_expires_at is not None and record.lease_expires_at >= cutoff
        )
    if step.status == StepStatus.RETRY_WAIT:
        return step.next_attempt_at is None or step.next_attempt_at >= cutoff
    return False
