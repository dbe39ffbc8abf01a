"""The numbers operators watch during an incident (dashboard, ``pipeline_status``, ``/metrics``).

Every function takes ``now`` so a page and its test see one instant. Counts use the indexes the
models declare: inputs (status, created_at), attempts (status, started_at), records (status,
lease_expires_at), step runs (step, status).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Count, Max, Min
from django.db.models.functions import TruncHour, TruncMinute
from django.utils import timezone

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus

from ..models import PipelineInput, StepRun
from ..states import InputStatus, StepStatus


@dataclass(frozen=True)
class AttemptSeriesPoint:
    start: datetime
    succeeded: int = 0
    failed: int = 0  # FAILED + UNKNOWN: the step did not (knowingly) happen
    fenced: int = 0  # late writes refused: duplicates prevented
    other: int = 0  # still running, or superseded (TIMED_OUT)

    @property
    def total(self) -> int:
        return self.succeeded + self.failed + self.fenced + self.other


@dataclass(frozen=True)
class StepFailureRate:
    step: str
    succeeded: int
    failed: int
    active: int

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    # Attempts at this step (every start), and those that failed: FAILED, UNKNOWN or TIMED_OUT.
    attempts: int = 0
    attempts_failed: int = 0

    @property
    def rate(self) -> float | None:
        """Failed share of finished step runs; None before any finished."""
        return self.failed / self.finished if self.finished else None

    @property
    def attempt_rate(self) -> float | None:
        """Failed share of this step's attempts (a step that succeeds on its 5th attempt had 4
        failures: the step-run rate hides them); None before any attempt."""
        return self.attempts_failed / self.attempts if self.attempts else None


@dataclass(frozen=True)
class LeaseSummary:
    processing: int
    stuck: int
    oldest_processing_started_at: datetime | None
    oldest_processing_age_seconds: float | None


@dataclass(frozen=True)
class QueueDepth:
    broker: str
    ready: int | None  # waiting for a worker
    in_flight: int | None  # taken by a cluster (ORM broker only: locked rows)
    error: str = ""


@dataclass(frozen=True)
class ClusterHeartbeat:
    cluster_id: str
    host: str
    status: str
    workers: int
    seen_at: datetime | None
    age_seconds: float | None


@dataclass(frozen=True)
class WorkerHost:
    """Step attempts started on one host (``Attempt.worker`` is host:pid) in a recent window."""

    host: str
    busy_now: int  # attempts RUNNING on this host now: its workers at work
    pids_seen: int  # distinct worker processes that started an attempt (recycled workers count again)
    attempts_started: int
    per_minute: float
    last_start: datetime | None


@dataclass(frozen=True)
class Dashboard:
    now: datetime
    inputs_last_hour: dict[str, int]
    inputs_last_day: dict[str, int]
    series: list[AttemptSeriesPoint]
    step_failure_rates: list[StepFailureRate]
    attempts_by_status: dict[str, int]
    leases: LeaseSummary
    queue: QueueDepth
    clusters: list[ClusterHeartbeat]
    workers_seen: list[tuple[str, datetime]] = field(default_factory=list)
    worker_hosts: list[WorkerHost] = field(default_factory=list)

    @property
    def duplicates_prevented(self) -> int:
        return self.attempts_by_status.get(AttemptStatus.FENCED, 0)

    @property
    def unknown_outcomes(self) -> int:
        return self.attempts_by_status.get(AttemptStatus.UNKNOWN, 0)


def inputs_count_by_status(*, since: datetime | None = None) -> dict[str, int]:
    """Inputs by status (every status present, zeros included), created at or after ``since``."""
    query = PipelineInput.objects.all()
    if since is not None:
        query = query.filter(created_at__gte=since)
    counts = dict(query.order_by().values_list("status").annotate(n=Count("pk")).values_list("status", "n"))
    return {status: counts.get(status, 0) for status in InputStatus.values}


def attempts_count_by_status(*, since: datetime | None = None) -> dict[str, int]:
    """Attempts by status (zeros included), started at or after ``since`` (all time if None)."""
    query = Attempt.objects.all()
    if since is not None:
        query = query.filter(started_at__gte=since)
    counts = dict(query.order_by().values_list("status").annotate(n=Count("pk")).values_list("status", "n"))
    return {status: counts.get(status, 0) for status in AttemptStatus.values}


def attempts_series(*, now: datetime | None = None, hours: int = 24, bucket: str = "hour") -> list[AttemptSeriesPoint]:
    """Attempts per bucket ("hour" or "minute") over the last ``hours``, by outcome, bucketed by
    start time (the indexed column). Empty buckets are included so a chart has no gaps."""
    now = now or timezone.now()
    step = timedelta(hours=1) if bucket == "hour" else timedelta(minutes=1)
    trunc = TruncHour if bucket == "hour" else TruncMinute
    first = _floor(now, step) - step * (int(timedelta(hours=hours) / step) - 1)
    rows = (
        Attempt.objects.filter(started_at__gte=first)
        .annotate(bucket=trunc("started_at"))
        .order_by()
        .values_list("bucket", "status")
        .annotate(n=Count("pk"))
    )
    buckets: dict[datetime, dict[str, int]] = {}
    for start, status, n in rows:
        key = _floor(start if timezone.is_aware(start) else timezone.make_aware(start), step)
        slot = buckets.setdefault(key, {})
        slot[status] = slot.get(status, 0) + n
    points = []
    start = first
    while start <= now:
        slot = buckets.get(start, {})
        points.append(
            AttemptSeriesPoint(
                start=start,
                succeeded=slot.get(AttemptStatus.SUCCEEDED, 0),
                failed=slot.get(AttemptStatus.FAILED, 0) + slot.get(AttemptStatus.UNKNOWN, 0),
                fenced=slot.get(AttemptStatus.FENCED, 0),
                other=slot.get(AttemptStatus.RUNNING, 0) + slot.get(AttemptStatus.TIMED_OUT, 0),
            )
        )
        start += step
    return points


def step_failure_rates() -> list[StepFailureRate]:
    """Per step name: succeeded, failed and still-active step runs (index on (step, status))."""
    counts: dict[str, dict[str, int]] = {}
    for step, status, n in StepRun.objects.order_by().values_list("step", "status").annotate(n=Count("pk")):
        counts.setdefault(step, {})[status] = n
    active = {StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT}
    # Attempts by step: the runner claims a step's key with operation "step:<name>".
    attempts: dict[str, dict[str, int]] = {}
    rows = (
        Attempt.objects.filter(record__scope="step").order_by().values_list("record__operation", "status").annotate(n=Count("pk"))
    )
    for operation, status, n in rows:
        attempts.setdefault(operation.removeprefix("step:"), {})[status] = n
    failed_attempt = {AttemptStatus.FAILED, AttemptStatus.UNKNOWN, AttemptStatus.TIMED_OUT}
    return [
        StepFailureRate(
            step=step,
            succeeded=by_status.get(StepStatus.SUCCEEDED, 0),
            failed=by_status.get(StepStatus.FAILED, 0),
            active=sum(n for s, n in by_status.items() if s in active),
            attempts=sum(attempts.get(step, {}).values()),
            attempts_failed=sum(n for s, n in attempts.get(step, {}).items() if s in failed_attempt),
        )
        for step, by_status in sorted(counts.items())
    ]


def leases_summary(*, now: datetime | None = None) -> LeaseSummary:
    """PROCESSING keys, those whose lease expired (stuck), and the oldest running attempt's age."""
    now = now or timezone.now()
    processing = IdempotencyRecord.objects.filter(status=RecordStatus.PROCESSING)
    oldest = (
        Attempt.objects.filter(status=AttemptStatus.RUNNING, record__status=RecordStatus.PROCESSING)
        .aggregate(oldest=Min("started_at"))["oldest"]
    )
    return LeaseSummary(
        processing=processing.count(),
        stuck=processing.filter(lease_expires_at__lt=now).count(),
        oldest_processing_started_at=oldest,
        oldest_processing_age_seconds=(now - oldest).total_seconds() if oldest else None,
    )


def queue_depth() -> QueueDepth:
    """Tasks waiting on the django-q2 queue (table brokers: OrmQ rows; Redis: the list length)."""
    from django.conf import settings

    from ..queueing import TABLE_BROKERS, process_broker

    broker_name = settings.PIPELINE_OPS_BROKER
    try:
        broker = process_broker()
        if broker_name in TABLE_BROKERS:
            # Straight to the table: the ORM broker's own queue_size() calls
            # close_old_connections() first, which on SQLite (CONN_MAX_AGE=0) closes the
            # request's connection mid-page.
            from django.db.models.functions import Now
            from django_q.conf import Conf
            from django_q.models import OrmQ

            rows = OrmQ.objects.using(Conf.ORM).filter(key=broker.list_key)
            # The PostgreSQL broker writes every lock on the database's clock: count on it too.
            now = Now() if broker_name == "postgres" else timezone.now()
            return QueueDepth(broker=broker_name, ready=rows.filter(lock__lte=now).count(), in_flight=rows.filter(lock__gt=now).count())
        return QueueDepth(broker=broker_name, ready=broker.queue_size(), in_flight=None)
    except Exception as exc:  # the dashboard must render while the broker is down: say so instead
        return QueueDepth(broker=broker_name, ready=None, in_flight=None, error=f"{type(exc).__name__}: {exc}"[:200])


def cluster_heartbeats(*, now: datetime | None = None) -> list[ClusterHeartbeat]:
    """django-q2 cluster stats (``django_q.status.Stat``). They live in Redis with the Redis
    broker, and in Django's cache with the ORM broker: with the default per-process LocMemCache
    no cluster is ever seen, so ``workers_seen`` (from our own attempts) is shown beside it."""
    now = now or timezone.now()
    try:
        from django_q.status import Stat

        from ..queueing import process_broker

        stats = Stat.get_all(broker=process_broker())
    except Exception:
        return []
    beats = []
    for stat in stats:
        seen = getattr(stat, "timestamp", None)
        beats.append(
            ClusterHeartbeat(
                cluster_id=str(getattr(stat, "cluster_id", "")),
                host=str(getattr(stat, "host", "")),
                status=str(getattr(stat, "status", "")),
                workers=len(getattr(stat, "workers", []) or []),
                seen_at=seen,
                age_seconds=(now - seen).total_seconds() if seen else None,
            )
        )
    return sorted(beats, key=lambda b: b.cluster_id)


def workers_seen(*, since: datetime) -> list[tuple[str, datetime]]:
    """Workers (host:pid) that started an attempt since ``since``, with their latest start."""
    rows = (
        Attempt.objects.filter(started_at__gte=since).exclude(worker="").order_by()
        .values_list("worker").annotate(last=Max("started_at")).values_list("worker", "last")
    )
    return sorted(rows, key=lambda row: row[1], reverse=True)[:50]


def workers_by_host(*, since: datetime, now: datetime | None = None) -> list[WorkerHost]:
    """Per host, from our own step attempts (any broker): attempts running now, distinct worker
    pids and attempts started since ``since``, and the start rate. Only step keys: the web
    server's API keys are not a worker's."""
    now = now or timezone.now()
    minutes = max((now - since).total_seconds() / 60, 1e-9)
    hosts: dict[str, dict] = {}
    recent = (
        Attempt.objects.filter(started_at__gte=since, record__scope="step").exclude(worker="").order_by()
        .values_list("worker").annotate(n=Count("pk"), last=Max("started_at")).values_list("worker", "n", "last")
    )
    for worker, n, last in recent:
        host = worker.rsplit(":", 1)[0]
        entry = hosts.setdefault(host, {"pids": 0, "n": 0, "last": None, "busy": 0})
        entry["pids"] += 1
        entry["n"] += n
        entry["last"] = max(filter(None, [entry["last"], last]))
    # A RUNNING attempt whose lease expired is stuck (its worker died or stalled): not busy.
    busy = (
        Attempt.objects.filter(status=AttemptStatus.RUNNING, record__scope="step", record__status=RecordStatus.PROCESSING,
                               record__lease_expires_at__gt=now)
        .exclude(worker="").values_list("worker", flat=True)
    )
    for worker in busy:
        hosts.setdefault(worker.rsplit(":", 1)[0], {"pids": 0, "n": 0, "last": None, "busy": 0})["busy"] += 1
    return [
        WorkerHost(host=host, busy_now=e["busy"], pids_seen=e["pids"], attempts_started=e["n"], per_minute=round(e["n"] / minutes, 1),
                   last_start=e["last"])
        for host, e in sorted(hosts.items())
    ]


def dashboard_get(*, now: datetime | None = None) -> Dashboard:
    now = now or timezone.now()
    return Dashboard(
        now=now,
        inputs_last_hour=inputs_count_by_status(since=now - timedelta(hours=1)),
        inputs_last_day=inputs_count_by_status(since=now - timedelta(days=1)),
        series=attempts_series(now=now, hours=24, bucket="hour"),
        step_failure_rates=step_failure_rates(),
        attempts_by_status=attempts_count_by_status(),
        leases=leases_summary(now=now),
        queue=queue_depth(),
        clusters=cluster_heartbeats(now=now),
        workers_seen=workers_seen(since=now - timedelta(minutes=15)),
        worker_hosts=workers_by_host(since=now - timedelta(minutes=15), now=now),
    )


def _floor(value: datetime, step: timedelta) -> datetime:
    value = value.astimezone(timezone.get_fixed_timezone(0)) if timezone.is_aware(value) else value
    if step >= timedelta(hours=1):
        return value.replace(minute=0, second=0, microsecond=0)
    return value.replace(second=0, microsecond=0)
