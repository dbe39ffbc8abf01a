"""Executing one step run under the guard: the service behind ``step_run_execute_task``.

Safe to run any number of times for the same step run, concurrently or late:

* the guard's claim decides who runs (Claimed), who replays (Replay: the step is done, make sure
  the next one is queued), and who returns at once (InFlight, Failed);
* the step's callable runs outside any transaction, with a heartbeat;
* its output, the step's SUCCEEDED, the next step's PENDING -> QUEUED with its enqueue (ORM
  broker: the queue row is in the same transaction, an outbox) and the input's roll-up commit
  in the transaction that completes the key, or not at all (a late attempt is fenced);
* every StepRun move is a conditional UPDATE from the sources that ``STEP_TRANSITIONS`` allows.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import connections, router, transaction
from django.db.models import F, OuterRef, Subquery, Value
from django.db.models.expressions import RawSQL
from django_q.models import OrmQ
from django.db.models.functions import Coalesce
from django.utils import timezone

from idempotency import guard
from idempotency.clock import db_now_expression
from idempotency.faults import is_infrastructure_error, retry_infrastructure
from idempotency.fingerprint import fingerprint
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.policy import NO_RETRY, RetryPolicy
from idempotency.states import RecordStatus

from ..models import PipelineInput, StepOutput, StepRun
from ..delivery import delivery_ack_id
from ..observability.logging import log_context_bind
from ..queueing import step_run_enqueue
from ..runner import attempt_heartbeat, step_call
from ..signals import step_effect_committed
from ..states import InputStatus, StepStatus, step_sources
from ..steps import Step, StepContext, UnknownStepError, step_get
from . import hotpath_postgresql
from .inputs import STEP_SCOPE, input_roll_up

log = logging.getLogger(__name__)


class Outcome:
    """What one execution did (the task's return value, as a string)."""

    SUCCEEDED = "succeeded"          # ran and completed the step
    REPLAYED = "replayed"            # the step was already completed: nothing ran
    IN_FLIGHT = "in_flight"          # another attempt holds the key, or its retry is not due
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"                # terminal failure (now or earlier)
    FENCED = "fenced"                # finished after losing the key: its write was refused
    SUPERSEDED = "superseded"        # failed after losing the key: only its Attempt row was written
    CANCELLED = "cancelled"
    NOT_RUNNABLE = "not_runnable"    # PENDING (earlier steps not done) or otherwise not queued
    MISMATCH = "mismatch"            # the key was used with another input fingerprint
    MISSING = "missing"              # no such step run


@dataclass(frozen=True)
class StepExecution:
    outcome: str
    step_run_id: int
    attempt_number: int | None = None
    message: str = ""


class StepNotRunnableError(Exception):
    """At its claim the step was no longer in a state a run may start from (e.g. cancelled)."""

    def __init__(self, status: str | None):
        self.status = status
        super().__init__(f"step is {status}, not runnable")


class StepNoLongerRunningError(Exception):
    """At completion the step run was no longer QUEUED/RUNNING although the attempt held the key."""


def step_fingerprint(*, pipeline: str, step: str, payload, outputs: dict) -> str:
    """SHA-256 of what the step computes from: the same input gives the same key fingerprint."""
    return fingerprint({"pipeline": pipeline, "step": step, "payload": payload, "outputs": outputs})


def step_run_queue_next(*, step_run: StepRun, now: datetime | None = None) -> int | None:
    """Queue the step after ``step_run`` if it is still PENDING; returns its id when this call
    queued it. The conditional PENDING -> QUEUED makes it exactly once however many callers race.
    Call inside the transaction that completes ``step_run`` (the enqueue joins it)."""
    now = now or timezone.now()
    if hasattr(step_run, "next_step_id"):  # the step's own read found it (``_step_run_read``)
        next_id = step_run.next_step_id
    else:
        next_id = StepRun.objects.filter(
            input_id=step_run.input_id, position=step_run.position + 1
        ).values_list("pk", flat=True).first()
    if next_id is None:
        return None
    if StepRun.objects.filter(pk=next_id, status=StepStatus.PENDING).update(
        # enqueued_at in the database's time: the reconciler judges a lost message by it.
        status=StepStatus.QUEUED, enqueued_at=db_now_expression(), updated_at=now
    ):
        step_run_enqueue(step_run_id=next_id)
        return next_id
    return None


def step_rows_lock(*, step_run_ids: list[int], input_id=None) -> None:
    """Lock step runs (in id order: an input's steps are created in position order), then their
    input: the first two places of the one lock order (``docs/guard.md``): step runs -> input ->
    idempotency record -> attempts -> queue rows. Call first in any transaction that will also
    touch the steps' keys. ``FOR NO KEY UPDATE`` does not conflict with the key-share locks that
    foreign-key checks of new rows (outputs, attempts) take.
    """
    if step_run_ids:
        list(StepRun.objects.select_for_update(no_key=True).filter(pk__in=step_run_ids).order_by("pk").values_list("pk", flat=True))
    if input_id is not None:
        list(PipelineInput.objects.select_for_update(no_key=True).filter(pk=input_id).values_list("pk", flat=True))


def input_rows_lock(*, input_id) -> None:
    """Lock all of an input's step runs, then the input (``step_rows_lock``): for a transaction
    about the whole input, such as a cancel."""
    step_ids = list(StepRun.objects.filter(input_id=input_id).order_by("pk").values_list("pk", flat=True))
    step_rows_lock(step_run_ids=step_ids, input_id=input_id)


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def _step_fail_without_attempt(*, step_run: StepRun, message: str, now: datetime) -> None:
    with transaction.atomic():
        StepRun.objects.filter(pk=step_run.pk, status__in=step_sources(StepStatus.FAILED)).update(
            status=StepStatus.FAILED, finished_at=now, last_error=message[:500], next_attempt_at=None, updated_at=now
        )
        input_roll_up(input_id=step_run.input_id, now=now)


def _one_statement_path() -> bool:
    """PostgreSQL claims and completes a step in one statement each (``hotpath_postgresql``);
    every other database runs the same protocol as a transaction of ORM statements."""
    return connections[router.db_for_write(StepRun)].vendor == "postgresql"


_EARLIER_OUTPUTS_SQL = {
    # One object {step: output} of the outputs of the steps before this one (PostgreSQL reads
    # them in ``hotpath_postgresql.step_read``).
    "sqlite": "json_group_object(o.step, json(o.output))",
}


def _step_run_read(*, step_run_id: int) -> StepRun | None:
    """The step run, its input, the outputs of the steps before it (``earlier_outputs``) and the
    id of the step after it (``next_step_id``), in one statement."""
    if _one_statement_path():
        return hotpath_postgresql.step_read(step_run_id=step_run_id)
    table = StepRun._meta.db_table
    aggregate = _EARLIER_OUTPUTS_SQL.get(connections[router.db_for_write(StepRun)].vendor)
    rows = StepRun.objects.select_related("input").filter(pk=step_run_id).annotate(
        next_step_id=Subquery(
            StepRun.objects.filter(input_id=OuterRef("input_id"), position=OuterRef("position") + 1).values("pk")[:1]
        ),
    )
    if aggregate is not None:
        rows = rows.annotate(earlier_outputs_json=RawSQL(
            f"SELECT {aggregate} FROM {StepOutput._meta.db_table} o JOIN {table} p ON p.id = o.step_run_id "
            f"WHERE o.input_id = {table}.input_id AND p.position < {table}.position", (),
        ))
    step_run = rows.first()
    if step_run is None:
        return None
    if aggregate is not None:
        step_run.earlier_outputs = json.loads(step_run.earlier_outputs_json or "{}")
    else:
        step_run.earlier_outputs = dict(
            StepOutput.objects.filter(input_id=step_run.input_id, step_run__position__lt=step_run.position).values_list("step", "output")
        ) if step_run.position else {}
    return step_run


def step_run_execute(*, step_run_id: int, now: datetime | None = None) -> StepExecution:
    """Run the step run once under the guard, or find out why not. Never raises for a busy,
    done, failed or cancelled step: the returned ``outcome`` says what happened.

    ``now`` is the claim's clock (tests pass a later time to make a retry due).
    Raises only on database errors.
    """
    claim_now = now or timezone.now()  # only for the bookkeeping of steps that never claim
    step_run = _retry_platform(lambda: _step_run_read(step_run_id=step_run_id), what=f"read of step run {step_run_id}")
    if step_run is None:
        return StepExecution(Outcome.MISSING, step_run_id)
    log_context_bind(input_id=step_run.input_id, step=step_run.step, key=step_run.idempotency_key)
    if step_run.input.status == InputStatus.CANCELLED or step_run.status == StepStatus.CANCELLED:
        return StepExecution(Outcome.CANCELLED, step_run_id)
    if step_run.status == StepStatus.PENDING:
        return StepExecution(Outcome.NOT_RUNNABLE, step_run_id, message="earlier steps are not done")
    if step_run.status == StepStatus.FAILED:
        return StepExecution(Outcome.FAILED, step_run_id, message="failed before; an operator retry re-queues it")
    try:
        step = step_get(name=step_run.step)
    except UnknownStepError as exc:
        _step_fail_without_attempt(step_run=step_run, message=str(exc), now=claim_now)
        return StepExecution(Outcome.FAILED, step_run_id, message=str(exc))

    outputs = step_run.earlier_outputs
    key_fingerprint = step_fingerprint(pipeline=step_run.input.pipeline, step=step_run.step, payload=step_run.input.payload, outputs=outputs)

    def claim_step() -> guard.ClaimOutcome:
        if now is None and _one_statement_path():
            # A new key for a runnable step (the common case) in one statement. Anything else (the
            # key exists: a replay, a retry, a takeover; or the step moved on) takes the locked
            # path below, which decides it exactly as before.
            new = hotpath_postgresql.step_claim_new(
                step_run=step_run, scope=STEP_SCOPE, operation=f"step:{step_run.step}",
                fingerprint=key_fingerprint, lease_seconds=step.lease_seconds,
            )
            if new.claimed is not None:
                step_run.input.status = InputStatus.RUNNING  # the claim's statement moved it
                return new.claimed
        return guard.claim(
            scope=STEP_SCOPE,
            key=step_run.idempotency_key,
            operation=f"step:{step_run.step}",
            fingerprint=key_fingerprint,
            lease_seconds=step.lease_seconds,
            max_attempts=step.policy.max_attempts,
            now=now,
            # The step (and, when the start rolls it up, the input) is locked before the key.
            lock_first=lambda: step_rows_lock(
                step_run_ids=[step_run.pk], input_id=None if step_run.input.status == InputStatus.RUNNING else step_run.input_id
            ),
            # The step's RUNNING commits with the claim: one commit per start, not two.
            on_claimed=lambda attempt: _step_run_start(step_run=step_run, attempt=attempt),
        )

    try:
        # A claim that fails for the platform's reasons is tried again; one whose commit landed
        # unseen finds its own live lease (InFlight), which the reconciler takes over on expiry.
        claim = _retry_platform(claim_step, what=f"claim of {step_run.idempotency_key}")
    except StepNotRunnableError as exc:
        # Cancelled (or otherwise moved) between our read and our claim: the claim was rolled
        # back, so no attempt exists and the key is as it was.
        outcome = Outcome.CANCELLED if exc.status == StepStatus.CANCELLED else Outcome.NOT_RUNNABLE
        return StepExecution(outcome, step_run_id, message=f"step is {exc.status}")
    if isinstance(claim, guard.Replay):
        # complete() moved this step to SUCCEEDED and queued the next one in its transaction;
        # this only closes a gap if something (an operator, a lost message) left the chain open.
        with transaction.atomic():
            step_run_queue_next(step_run=step_run)
            input_roll_up(input_id=step_run.input_id)
        return StepExecution(Outcome.REPLAYED, step_run_id)
    if isinstance(claim, guard.InFlight):
        return StepExecution(Outcome.IN_FLIGHT, step_run_id, message=f"until {claim.until:%H:%M:%S}")
    if isinstance(claim, guard.Mismatch):
        message = "the step's input changed since its key was first used (fingerprint mismatch)"
        _step_fail_without_attempt(step_run=step_run, message=message, now=claim_now)
        return StepExecution(Outcome.MISMATCH, step_run_id, message=message)
    if isinstance(claim, guard.Failed):
        _step_fail_without_attempt(step_run=step_run, message=claim.record.error_summary or "failed", now=claim_now)
        return StepExecution(Outcome.FAILED, step_run_id, message=claim.record.error_summary)

    attempt = claim.attempt
    log_context_bind(attempt=attempt.number)
    ctx = StepContext(
        step=step_run.step, step_run_id=step_run.pk, input_id=str(step_run.input_id),
        idempotency_key=step_run.idempotency_key, attempt_number=attempt.number,
        payload=step_run.input.payload, outputs=outputs, timeout_seconds=step.timeout_seconds,
    )
    # The heartbeat spans the commit too: a completion retried through a database restart keeps
    # its key while it waits.
    with attempt_heartbeat(step=step, ctx=ctx, attempt=attempt):
        try:
            output = step_call(step=step, ctx=ctx)
            json.dumps(output, allow_nan=False)  # a result we could not store is the step's error
        except Exception as exc:  # the step's own failure, classified by its policy
            return _step_run_after_error(step_run=step_run, step=step, attempt=attempt, error=exc, details=ctx.details)
        return _step_run_complete(step_run=step_run, step=step, attempt=attempt, output=output, details=ctx.details)


def _retry_platform(func, *, what: str, seconds: float | None = None):
    """Run one transaction again while it fails for the platform's reasons (``idempotency.faults``),
    for a bounded time. Each of ours is safe to repeat: fenced by the attempt number, or
    conditional on the state it read."""
    return retry_infrastructure(
        func, using=router.db_for_write(StepRun), what=what,
        deadline_seconds=settings.PIPELINE_OPS_DB_RETRY_SECONDS if seconds is None else seconds,
    )


def _step_run_start(*, step_run: StepRun, attempt: Attempt) -> None:
    """Move the step to RUNNING for ``attempt``, inside the claim's transaction.

    Raises StepNotRunnableError (rolling the claim back) when the step is no longer runnable.
    """
    now = timezone.now()
    moved = StepRun.objects.filter(pk=step_run.pk, status__in=step_sources(StepStatus.RUNNING)).update(
        status=StepStatus.RUNNING, attempts_used=F("attempts_used") + 1,
        started_at=Coalesce(F("started_at"), Value(now)), next_attempt_at=None,
        idempotency_record_id=attempt.record_id, updated_at=now,
    )
    if not moved:
        status = StepRun.objects.filter(pk=step_run.pk).values_list("status", flat=True).first()
        raise StepNotRunnableError(status)
    if step_run.input.status != InputStatus.RUNNING:
        # A started step rolls an input up to RUNNING; one already RUNNING stays so (an
        # aggregate and an UPDATE saved on every step after the first).
        input_roll_up(input_id=step_run.input_id, now=now)


def _step_run_complete(*, step_run: StepRun, step: Step, attempt: Attempt, output: dict, details: dict) -> StepExecution:
    now = timezone.now()

    def write() -> None:
        # The unique (input, step) constraint refuses a second output even if the guard erred.
        StepOutput.objects.create(step_run_id=step_run.pk, input_id=step_run.input_id, step=step_run.step, attempt=attempt, output=output)
        done = StepRun.objects.filter(pk=step_run.pk, status__in=step_sources(StepStatus.SUCCEEDED)).update(
            status=StepStatus.SUCCEEDED, finished_at=now, last_error="", next_attempt_at=None, updated_at=now
        )
        if not done:
            if not _holds_key(attempt):
                # Cancelled or force-retried: the key was taken away, so the guard's own
                # conditional UPDATE refuses this completion and marks the attempt FENCED.
                return
            raise StepNoLongerRunningError(f"step run {step_run.pk} left RUNNING while attempt #{attempt.number} held its key")
        ack_id = delivery_ack_id()
        if ack_id is not None:
            # The delivered task's own queue row goes with the completion (pipeline_ops.delivery).
            OrmQ.objects.filter(pk=ack_id).delete()
        queued = step_run_queue_next(step_run=step_run, now=now)
        if queued is None or step_run.input.status != InputStatus.RUNNING:
            # The last step (or an unusual chain) may change the input; a middle step of a
            # running input leaves it RUNNING, so the roll-up's two queries are skipped.
            input_roll_up(input_id=step_run.input_id, now=now)

    def complete() -> guard.Completion:
        if _one_statement_path():
            return hotpath_postgresql.step_complete(
                step_run=step_run, attempt=attempt, output=output, details=details or None,
                next_step_id=step_run.next_step_id, input_running=step_run.input.status == InputStatus.RUNNING,
                ack_id=delivery_ack_id(),
            )
        return guard.complete(attempt=attempt, result=output, write=write, details=details or None)

    try:
        # The paid answer is kept through a database restart: the completion is retried with
        # backoff (fenced by the attempt number; a first commit that landed unseen is recognised
        # as "already completed by this attempt").
        completion = _retry_platform(
            complete,
            what=f"completion of {step_run.idempotency_key} #{attempt.number}",
            seconds=settings.PIPELINE_OPS_COMPLETION_RETRY_SECONDS,
        )
    except hotpath_postgresql.StepLeftRunningError as exc:
        return _step_run_after_error(step_run=step_run, step=step, attempt=attempt, error=exc, details=details, policy=NO_RETRY)
    except Exception as exc:
        if is_infrastructure_error(exc):
            # Out of time: whether the first commit landed is unknown to us; the key decides.
            # The attempt ends UNKNOWN and the step is retried (never terminal for this).
            return _step_run_after_error(step_run=step_run, step=step, attempt=attempt, error=exc, details=details, unknown=True)
        # A domain write that failed while we held the key (its own constraint, a value the
        # database refuses): retrying gives the same answer.
        return _step_run_after_error(step_run=step_run, step=step, attempt=attempt, error=exc, details=details, policy=NO_RETRY)
    if completion.fenced:
        log.info("attempt #%s of %s fenced: %s", attempt.number, step_run.idempotency_key, completion.reason)
        return StepExecution(Outcome.FENCED, step_run.pk, attempt.number, message=completion.reason)
    step_effect_committed.send(
        sender=StepRun, step_run_id=step_run.pk, input_id=step_run.input_id, step=step_run.step,
        key=step_run.idempotency_key, attempt_number=attempt.number, worker=attempt.worker,
    )
    return StepExecution(Outcome.SUCCEEDED, step_run.pk, attempt.number)


def _holds_key(attempt: Attempt) -> bool:
    """Whether ``attempt`` still owns its key inside the completing transaction: PROCESSING under
    its number, or already COMPLETED under it (when the guard's conditional UPDATE ran first)."""
    return IdempotencyRecord.objects.filter(
        pk=attempt.record_id, status__in=[RecordStatus.PROCESSING, RecordStatus.COMPLETED], attempt_count=attempt.number
    ).exists()


def _step_run_after_error(
    *, step_run: StepRun, step: Step, attempt: Attempt, error: BaseException, details: dict,
    policy: RetryPolicy | None = None, unknown: bool | None = None,
) -> StepExecution:
    """The key's failure and the step's move in one transaction (nobody can claim in between),
    the step's move conditional on this attempt still holding the key."""
    unknown = step.is_outcome_unknown(error) if unknown is None else unknown
    line = _one_line(error)
    moved: dict[str, str] = {}

    def move(failure: guard.FailureOutcome) -> None:
        now = timezone.now()
        if failure.retry_at is not None:
            # Due retries are enqueued by the reconciler (django-q2 has no delayed enqueue).
            StepRun.objects.filter(pk=step_run.pk, status=StepStatus.RUNNING).update(
                status=StepStatus.RETRY_WAIT, next_attempt_at=failure.retry_at, last_error=line, updated_at=now
            )
            moved["outcome"] = Outcome.RETRY_SCHEDULED
        else:
            StepRun.objects.filter(pk=step_run.pk, status__in=step_sources(StepStatus.FAILED)).update(
                status=StepStatus.FAILED, finished_at=now, next_attempt_at=None, last_error=line, updated_at=now
            )
            moved["outcome"] = Outcome.FAILED
            input_roll_up(input_id=step_run.input_id, now=now)

    def fail_in_one_transaction() -> guard.FailureOutcome:
        with transaction.atomic():
            step_rows_lock(step_run_ids=[step_run.pk], input_id=step_run.input_id)
            return guard.fail(
                attempt=attempt, error=error, policy=policy or step.policy, outcome_unknown=unknown,
                details=details or None, on_failed=move,
            )

    # If the database stays away longer than this, the attempt stays RUNNING until its lease
    # runs out and the reconciler hands the step to a new attempt: late, never lost.
    failure = _retry_platform(fail_in_one_transaction, what=f"failure of {step_run.idempotency_key} #{attempt.number}")
    if not failure.held:
        return StepExecution(Outcome.SUPERSEDED, step_run.pk, attempt.number, message=line)
    return StepExecution(moved["outcome"], step_run.pk, attempt.number, message=line)
