"""Services for pipeline inputs: submission, the status roll-up from steps, cancellation."""
from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, connections, router, transaction
from django.db.models import Count
from django.utils import timezone

from idempotency.clock import db_now_expression

from ..models import PipelineInput, StepRun
from ..pipelines import pipeline_get
from ..queueing import step_run_enqueue
from ..states import INPUT_TERMINAL, InputStatus, StepStatus, step_sources


@dataclass(frozen=True)
class SubmitResult:
    input: PipelineInput
    created: bool


def input_submit(
    *,
    pipeline: str,
    payload: dict,
    scope: str,
    key: str = "",
    submitted_by: AbstractBaseUser | None = None,
) -> SubmitResult:
    """Create the input, its step runs and the first step's task in one transaction.

    With a ``key``, a second submission in the same ``scope`` returns the existing input with
    ``created=False`` (the unique constraint decides, not a prior lookup).
    Raises UnknownPipelineError.
    """
    spec = pipeline_get(name=pipeline)
    pipeline_input = PipelineInput(
        pipeline=spec.name, payload=payload, submission_scope=scope, idempotency_key=key, submitted_by=submitted_by,
    )
    # A keyed submission's insert does nothing on a conflict (no error), so no savepoint is
    # needed inside a caller's transaction (the API's, which completes its key in it).
    keyed_insert = bool(key) and _insert_if_new_supported()
    try:
        with transaction.atomic(savepoint=not keyed_insert):
            if keyed_insert:
                if not _input_insert_if_new(pipeline_input):
                    existing = PipelineInput.objects.get(submission_scope=scope, idempotency_key=key)
                    return SubmitResult(input=existing, created=False)
            else:
                pipeline_input.save(force_insert=True)
            steps = StepRun.objects.bulk_create(
                [
                    StepRun(
                        input=pipeline_input, step=name, position=position,
                        status=StepStatus.QUEUED if position == 0 else StepStatus.PENDING,
                        # The database's clock: the reconciler judges staleness by it.
                        enqueued_at=db_now_expression() if position == 0 else None,
                    )
                    for position, name in enumerate(spec.steps)
                ]
            )
            first = steps[0] if steps[0].pk else StepRun.objects.get(input=pipeline_input, position=0)
            step_run_enqueue(step_run_id=first.pk)
    except IntegrityError:
        if not key or keyed_insert:
            raise
        existing = PipelineInput.objects.get(submission_scope=scope, idempotency_key=key)
        return SubmitResult(input=existing, created=False)
    return SubmitResult(input=pipeline_input, created=True)


def _insert_if_new_supported() -> bool:
    # PostgreSQL and SQLite (3.35+) both take ON CONFLICT ... WHERE ... DO NOTHING RETURNING.
    return connections[router.db_for_write(PipelineInput)].vendor in ("postgresql", "sqlite")


def _input_insert_if_new(pipeline_input: PipelineInput) -> bool:
    """Insert ``pipeline_input`` unless an input with its scope and key exists (the partial unique
    constraint decides); True when this call inserted it."""
    connection = connections[router.db_for_write(PipelineInput)]
    qn = connection.ops.quote_name
    fields = PipelineInput._meta.concrete_fields
    values = [f.get_db_prep_save(f.pre_save(pipeline_input, add=True), connection) for f in fields]
    sql = (
        f"INSERT INTO {qn(PipelineInput._meta.db_table)} ({', '.join(qn(f.column) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))}) "
        # The predicate as the migration wrote the partial index (SQLite matches it by its form).
        f"ON CONFLICT ({qn('submission_scope')}, {qn('idempotency_key')}) WHERE NOT ({qn('idempotency_key')} = '') "
        f"DO NOTHING RETURNING {qn('id')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        inserted = cursor.fetchone() is not None
    if inserted:
        pipeline_input._state.adding, pipeline_input._state.db = False, connection.alias
    return inserted


# The guard's scope for step keys; a step's key is ``StepRun.idempotency_key`` ("<input>:<step>").
STEP_SCOPE = "step"

_ROLL_UP_FROM = [InputStatus.PENDING, InputStatus.RUNNING, InputStatus.FAILED]


def input_status_from_steps(counts: dict[str, int]) -> str | None:
    """The input status its steps imply (None: cancelled, which only ``input_cancel`` decides).

    All succeeded -> SUCCEEDED; any failed -> FAILED; any started, waiting or done -> RUNNING;
    otherwise PENDING. FAILED is not final here: an operator's retry re-queues the failed step,
    and the next roll-up brings the input back to RUNNING.
    """
    total = sum(counts.values())
    if total == 0 or counts.get(StepStatus.CANCELLED):
        return None
    if counts.get(StepStatus.SUCCEEDED, 0) == total:
        return InputStatus.SUCCEEDED
    if counts.get(StepStatus.FAILED):
        return InputStatus.FAILED
    if any(counts.get(s) for s in (StepStatus.RUNNING, StepStatus.RETRY_WAIT, StepStatus.SUCCEEDED)):
        return InputStatus.RUNNING
    return InputStatus.PENDING


def input_roll_up(*, input_id, now=None) -> str | None:
    """Recompute the input's status from its steps; returns the new status if it changed.

    One aggregate and one conditional UPDATE (never from CANCELLED, never a no-op write), so it
    is cheap to call after every step move, inside the move's transaction.
    """
    now = now or timezone.now()
    rows = StepRun.objects.filter(input_id=input_id).order_by().values("status").annotate(n=Count("id"))
    target = input_status_from_steps({row["status"]: row["n"] for row in rows})
    if target is None:
        return None
    finished = now if target in INPUT_TERMINAL else None
    updated = (
        PipelineInput.objects.filter(pk=input_id, status__in=_ROLL_UP_FROM)
        .exclude(status=target)
        .update(status=target, finished_at=finished, updated_at=now)
    )
    return target if updated else None


class _NotCancellable(Exception):
    """The input left PENDING/RUNNING/FAILED while we were cancelling it: roll everything back."""


def input_cancel(*, pipeline_input: PipelineInput, reason: str = "input cancelled", now=None) -> int:
    """Cancel the input: it becomes CANCELLED, its unfinished steps CANCELLED, and the key of a
    running step is released so that attempt's late completion is fenced. Returns the number of
    steps cancelled (0 if the input had already succeeded or was cancelled before).

    Runs in one transaction. The records are found by key, not through ``StepRun
    .idempotency_record``: an attempt that claimed but has not linked its record yet is fenced
    too, and one that claims after this commit finds its step CANCELLED and ends itself. Rows are
    locked in the one lock order (``docs/guard.md``: step runs -> input -> records), the order of
    a completing or claiming step, so a cancel racing one waits for it instead of deadlocking.
    Raises nothing for an input that cannot be cancelled; the return value says so.
    """
    from idempotency import guard
    from idempotency.models import IdempotencyRecord
    from idempotency.states import RecordStatus

    from .steps import input_rows_lock

    now = now or timezone.now()
    if not PipelineInput.objects.filter(pk=pipeline_input.pk, status__in=_ROLL_UP_FROM).exists():
        return 0
    try:
        with transaction.atomic():
            input_rows_lock(input_id=pipeline_input.pk)  # re-entrant: a caller may hold them already
            open_steps = list(
                StepRun.objects.filter(input_id=pipeline_input.pk, status__in=step_sources(StepStatus.CANCELLED))
                .values_list("pk", "step")
            )
            keys = [f"{pipeline_input.pk}:{step}" for _, step in open_steps]
            for record in IdempotencyRecord.objects.filter(scope=STEP_SCOPE, key__in=keys, status=RecordStatus.PROCESSING).order_by("pk"):
                guard.release(record=record, reason=reason)
            cancelled = StepRun.objects.filter(
                pk__in=[pk for pk, _ in open_steps], status__in=step_sources(StepStatus.CANCELLED)
            ).update(status=StepStatus.CANCELLED, finished_at=now, next_attempt_at=None, updated_at=now)
            if not PipelineInput.objects.filter(pk=pipeline_input.pk, status__in=_ROLL_UP_FROM).update(
                status=InputStatus.CANCELLED, finished_at=now, updated_at=now
            ):
                raise _NotCancellable
    except _NotCancellable:
        return 0
    pipeline_input.status, pipeline_input.finished_at = InputStatus.CANCELLED, now
    return cancelled
