"""The pipeline's history retention, and the one entry point that runs every retention stage.

The idempotency log keeps two retentions of its own (``idempotency.purge``): a key is forgotten
after the key retention (24 h) and its record and attempts are deleted after the history
retention (``IDEMPOTENCY["HISTORY_RETENTION_HOURS"]``, 30 days). The pipeline's own history lives
exactly as long: finished inputs with their step runs and outputs, operator actions and finished
background actions are deleted here once they are older than the history retention, never
anything live:

* an input only when it is finished (SUCCEEDED, FAILED or CANCELLED), none of its steps is
  QUEUED, RUNNING or waiting to retry, none of their keys is PROCESSING, and neither it nor any
  of its steps changed within the retention (an operator's retry of a dead step moves both);
* an operator action only when no unfinished background action owns its batch; a background
  action only when DONE or FAILED.

What goes is added to ``PurgedTally`` in the transaction of its delete (inputs by status, step
runs by step and status, the step latency histogram), so ``/metrics`` never goes backwards.
The step runs' idempotency records stay while their step runs exist (``records_in_use``, the
``IDEMPOTENCY["HISTORY_KEEP"]`` hook), so a step's timeline never loses its attempts first.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Count, Exists, OuterRef, Q, QuerySet

from idempotency import conf as idempotency_conf
from idempotency.clock import db_now
from idempotency.purge import PurgeReport, records_purge, tally_add
from idempotency.states import RecordStatus

from ..models import BulkAction, OperatorAction, PipelineInput, StepOutput, StepRun
from ..observability.latency import LATENCY_BUCKETS_SECONDS, step_latency_rows
from ..states import INPUT_TERMINAL, StepStatus

# PurgedTally names of the pipeline's rows (idempotency's are "attempts" and "replays").
INPUTS_TALLY = "inputs"  # label: status
STEP_RUNS_TALLY = "step_runs"  # label: "<status>:<step>"
LATENCY_TALLY = "step_latency"  # label: "<step>|count", "<step>|le_<i>", "<step>|micros"

# Steps in these statuses are live work: the purge never deletes their input.
_LIVE_STEP_STATUSES = (StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT)


@dataclass
class HistoryPurgeReport:
    """Rows deleted (``dry_run``: would be) by the pipeline's history purge."""

    inputs: int = 0
    step_runs: int = 0
    outputs: int = 0
    operator_actions: int = 0
    bulk_actions: int = 0


@dataclass
class RetentionReport:
    history: HistoryPurgeReport = field(default_factory=HistoryPurgeReport)
    log: PurgeReport = field(default_factory=PurgeReport)


def history_cutoff(*, now: datetime, older_than_hours: float | None = None) -> datetime:
    """Rows last changed before this are past the history retention (or ``older_than_hours``)."""
    _, history_hours = idempotency_conf.retention_hours()
    return now - timedelta(hours=history_hours if older_than_hours is None else older_than_hours)


def inputs_list_purgeable(*, cutoff: datetime) -> QuerySet:
    """Finished inputs whose history is past ``cutoff`` and that hold no live work."""
    steps = StepRun.objects.filter(input_id=OuterRef("pk"))
    live = steps.filter(
        Q(status__in=_LIVE_STEP_STATUSES) | Q(updated_at__gte=cutoff) | Q(idempotency_record__status=RecordStatus.PROCESSING)
    )
    return (
        PipelineInput.objects.filter(status__in=INPUT_TERMINAL, updated_at__lt=cutoff)
        .exclude(finished_at__gte=cutoff)
        .exclude(Exists(live))
    )


def operator_actions_list_purgeable(*, cutoff: datetime) -> QuerySet:
    running = BulkAction.objects.exclude(status__in=[BulkAction.Status.DONE, BulkAction.Status.FAILED]).values("batch")
    return OperatorAction.objects.filter(created_at__lt=cutoff).exclude(batch__in=running)


def bulk_actions_list_purgeable(*, cutoff: datetime) -> QuerySet:
    return BulkAction.objects.filter(status__in=[BulkAction.Status.DONE, BulkAction.Status.FAILED], updated_at__lt=cutoff)


def records_in_use() -> QuerySet:
    """Ids of idempotency records that step runs still show (``IDEMPOTENCY["HISTORY_KEEP"]``):
    the log's history stage leaves them until their step runs are purged here."""
    return StepRun.objects.filter(idempotency_record__isnull=False).values("idempotency_record_id")


def history_purge(
    *,
    now: datetime | None = None,
    older_than_hours: float | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> HistoryPurgeReport:
    """Delete the pipeline's history past the history retention, one short transaction per batch.

    ``limit`` bounds each kind of row; ``on_batch(n)`` is told of every batch (a progress bar).
    Raises ImproperlyConfigured when the retention settings are inconsistent.
    """
    now = now or db_now(model=PipelineInput)  # the database's clock decides what is old
    cutoff = history_cutoff(now=now, older_than_hours=older_than_hours)
    batch_size = batch_size or idempotency_conf.get("PURGE_BATCH_SIZE")
    report = HistoryPurgeReport()
    if dry_run:
        inputs = inputs_list_purgeable(cutoff=cutoff).values("pk")
        if limit is not None:
            inputs = inputs.order_by("pk")[:limit]
        input_ids = list(inputs.values_list("pk", flat=True))
        report.inputs = len(input_ids)
        report.step_runs = StepRun.objects.filter(input_id__in=input_ids).count()
        report.outputs = StepOutput.objects.filter(input_id__in=input_ids).count()
        report.operator_actions = _capped(operator_actions_list_purgeable(cutoff=cutoff).count(), limit)
        report.bulk_actions = _capped(bulk_actions_list_purgeable(cutoff=cutoff).count(), limit)
        return report

    def delete_inputs(ids: list) -> int:
        # The lock order of every service (docs/guard.md): the inputs' step runs, then the inputs.
        # The rule is checked again under the locks, in a statement that sees every commit made
        # before them: an operator's retry that got there first has moved the step, and one
        # that comes later waits for this transaction and then finds nothing to retry.
        list(StepRun.objects.select_for_update().filter(input_id__in=ids).order_by("pk").values_list("pk", flat=True))
        ids = list(inputs_list_purgeable(cutoff=cutoff).select_for_update().filter(pk__in=ids)
                   .order_by("pk").values_list("pk", flat=True))
        if not ids:
            return 0
        steps = StepRun.objects.filter(input_id__in=ids)
        tally_add(counts=_tally_of(inputs=PipelineInput.objects.filter(pk__in=ids), steps=steps))
        report.step_runs += steps.count()
        report.outputs += StepOutput.objects.filter(input_id__in=ids).count()
        return PipelineInput.objects.filter(pk__in=ids).delete()[1].get(PipelineInput._meta.label, 0)

    def delete_where(rows: Callable[[], QuerySet]) -> Callable[[list], int]:
        # One conditional DELETE: the rule is part of the statement itself.
        return lambda ids: rows().filter(pk__in=ids).delete()[0]

    report.inputs = _in_batches(
        lambda: inputs_list_purgeable(cutoff=cutoff), delete_inputs, batch_size=batch_size, limit=limit, on_batch=on_batch)
    report.operator_actions = _in_batches(
        lambda: operator_actions_list_purgeable(cutoff=cutoff),
        delete_where(lambda: operator_actions_list_purgeable(cutoff=cutoff)), batch_size=batch_size, limit=limit, on_batch=on_batch)
    report.bulk_actions = _in_batches(
        lambda: bulk_actions_list_purgeable(cutoff=cutoff),
        delete_where(lambda: bulk_actions_list_purgeable(cutoff=cutoff)), batch_size=batch_size, limit=limit, on_batch=on_batch)
    return report


def retention_purge(
    *,
    now: datetime | None = None,
    older_than_hours: float | None = None,
    history_older_than_hours: float | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RetentionReport:
    """Every retention stage, in the order that keeps history whole: the pipeline's history
    first (its step runs then no longer hold their records), then the idempotency log's two
    stages (records past the history retention deleted, keys past the key retention forgotten).
    Raises ImproperlyConfigured when the retention settings are inconsistent."""
    now = now or db_now(model=PipelineInput)
    history = history_purge(now=now, older_than_hours=history_older_than_hours, batch_size=batch_size,
                            dry_run=dry_run, limit=limit, on_batch=on_batch)
    keep = None  # the HISTORY_KEEP setting: records of the step runs still there
    if dry_run:
        # Nothing was deleted, so count as if the step runs of the purgeable inputs were gone.
        cutoff = history_cutoff(now=now, older_than_hours=history_older_than_hours)
        keep = records_in_use().exclude(input_id__in=inputs_list_purgeable(cutoff=cutoff).values("pk"))
    log = records_purge(now=now, older_than_hours=older_than_hours, history_older_than_hours=history_older_than_hours,
                        batch_size=batch_size, dry_run=dry_run, limit=limit, keep_record_ids=keep,
                        on_forget=on_batch, on_batch=on_batch)
    return RetentionReport(history=history, log=log)


# --- the tallies ----------------------------------------------------------------------------------


def _tally_of(*, inputs: QuerySet, steps: QuerySet) -> list[tuple[str, str, int]]:
    """What deleting ``inputs`` (and their ``steps``) takes away from /metrics' figures."""
    counts = [(INPUTS_TALLY, status, n) for status, n in inputs.order_by().values_list("status").annotate(n=Count("pk"))]
    counts += [(STEP_RUNS_TALLY, f"{status}:{step}", n) for step, status, n in
               steps.order_by().values_list("step", "status").annotate(n=Count("pk"))]
    for row in step_latency_rows(step_runs=steps):
        step = row["step"]
        counts.append((LATENCY_TALLY, f"{step}|count", row["count"]))
        counts.append((LATENCY_TALLY, f"{step}|micros", round(row["seconds"] * 1e6)))
        counts += [(LATENCY_TALLY, f"{step}|le_{i}", row[f"le_{i}"]) for i in range(len(LATENCY_BUCKETS_SECONDS))]
    return counts


def step_runs_from_tally(totals: dict[str, int]) -> dict[tuple[str, str], int]:
    """``purged_totals(STEP_RUNS_TALLY)`` as ``{(step, status): n}``."""
    out: dict[tuple[str, str], int] = {}
    for label, n in totals.items():
        status, _, step = label.partition(":")
        out[(step, status)] = out.get((step, status), 0) + n
    return out


def latency_from_tally(totals: dict[str, int]) -> dict[str, dict]:
    """``purged_totals(LATENCY_TALLY)`` as ``{step: {"count", "seconds", "le_<i>"}}``."""
    out: dict[str, dict] = {}
    for label, n in totals.items():
        step, _, part = label.rpartition("|")
        row = out.setdefault(step, {"count": 0, "seconds": 0.0, **{f"le_{i}": 0 for i in range(len(LATENCY_BUCKETS_SECONDS))}})
        if part == "micros":
            row["seconds"] += n / 1e6
        else:
            row[part] += n
    return out


def _capped(count: int, limit: int | None) -> int:
    return count if limit is None else min(limit, count)


def _in_batches(select: Callable[[], QuerySet], act: Callable[[list], int], *, batch_size: int, limit: int | None,
                on_batch: Callable[[int], None] | None) -> int:
    done = 0
    while limit is None or done < limit:
        size = batch_size if limit is None else min(batch_size, limit - done)
        with transaction.atomic():
            ids = list(select().order_by("pk").values_list("pk", flat=True)[:size])
            if not ids:
                break
            n = act(ids)
        done += n
        if on_batch and n:
            on_batch(n)
        if n == 0:
            break  # every row of the batch moved under us: the next purge looks again
    return done
