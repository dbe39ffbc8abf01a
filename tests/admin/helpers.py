"""Building real states for the console's tests: inputs through ``input_submit``, attempts
through the guard (claim / fail / complete) with the runner's own fingerprint, so the real
runner (``step_run_execute_task``) can carry on from any state built here."""
from __future__ import annotations

import uuid
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db.models import F
from django.utils import timezone

from idempotency import guard
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.models import PipelineInput, StepRun
from pipeline_ops.services.inputs import input_submit
from pipeline_ops.services.steps import step_fingerprint
from pipeline_ops.states import InputStatus, StepStatus

TEXT = "The provider came back. Everything is fine now, and the summary should say so."


def submit(*, text: str = TEXT, pipeline: str = "default") -> PipelineInput:
    return input_submit(pipeline=pipeline, payload={"text": text}, scope="tests", key=uuid.uuid4().hex).input


def first_step(pipeline_input: PipelineInput) -> StepRun:
    return StepRun.objects.get(input=pipeline_input, position=0)


def claim_step(step_run: StepRun, *, worker: str = "worker-a:101", lease_seconds: float = 30, now=None) -> Attempt:
    """A worker claims the step (as the runner does) and the step becomes RUNNING."""
    step_run.refresh_from_db()
    outcome = guard.claim(
        scope="step", key=step_run.idempotency_key, operation=f"step:{step_run.step}",
        fingerprint=step_fingerprint(pipeline=step_run.input.pipeline, step=step_run.step, payload=step_run.input.payload, outputs={}),
        lease_seconds=lease_seconds, worker=worker, now=now,
    )
    assert isinstance(outcome, guard.Claimed), outcome
    StepRun.objects.filter(pk=step_run.pk).update(
        status=StepStatus.RUNNING, attempts_used=F("attempts_used") + 1, idempotency_record=outcome.attempt.record,
        started_at=timezone.now(),
    )
    PipelineInput.objects.filter(pk=step_run.input_id).update(status=InputStatus.RUNNING)
    return outcome.attempt


def fail_step(step_run: StepRun, *, error: Exception | None = None, worker: str = "worker-a:101") -> Attempt:
    """A worker claims the step and its attempt fails for good (as the runner records it)."""
    attempt = claim_step(step_run, worker=worker)
    error = error or ConnectionError("model provider returned 503 (outage)")
    try:
        raise error  # raised for real, so the attempt keeps a real traceback
    except Exception as exc:
        guard.fail(attempt=attempt, error=exc, details={"latency_ms": 1234, "tokens": 0})
    StepRun.objects.filter(pk=step_run.pk).update(
        status=StepStatus.FAILED, last_error=f"{type(error).__name__}: {error}", finished_at=timezone.now()
    )
    PipelineInput.objects.filter(pk=step_run.input_id).update(status=InputStatus.FAILED, finished_at=timezone.now())
    attempt.refresh_from_db()
    return attempt


def make_stuck(step_run: StepRun, *, worker: str = "worker-dead:7") -> Attempt:
    """A worker claimed the step and died: its lease ran out a minute ago."""
    attempt = claim_step(step_run, worker=worker, lease_seconds=1, now=timezone.now() - timedelta(seconds=61))
    return attempt


def failed_input(*, error: Exception | None = None, **kwargs) -> tuple[PipelineInput, StepRun, Attempt]:
    pipeline_input = submit(**kwargs)
    step_run = first_step(pipeline_input)
    attempt = fail_step(step_run, error=error)
    pipeline_input.refresh_from_db()
    step_run.refresh_from_db()
    return pipeline_input, step_run, attempt


def operator(username: str, *perms: str, superuser: bool = False):
    """A staff user with view permissions on the console's models plus ``perms`` (codenames)."""
    User = get_user_model()
    user = User.objects.create_user(username=username, password="pw-" + username, is_staff=True, is_superuser=superuser)
    view = Permission.objects.filter(
        content_type__app_label__in=["pipeline_ops", "idempotency"], codename__startswith="view_"
    )
    user.user_permissions.add(*view, *Permission.objects.filter(content_type__app_label="pipeline_ops", codename__in=perms))
    return User.objects.get(pk=user.pk)  # fresh: no cached permissions


def bulk_world(*, inputs: int) -> dict[str, int]:
    """A few thousand rows in every console table, with bulk_create: inputs of every status,
    three steps each, records and attempts (failed, fenced, unknown, running, stuck)."""
    now = timezone.now()
    statuses = [InputStatus.SUCCEEDED, InputStatus.SUCCEEDED, InputStatus.FAILED, InputStatus.RUNNING, InputStatus.CANCELLED]
    objs = [
        PipelineInput(
            pipeline="default", payload={"text": "x" * 300, "n": i}, submission_scope="bulk", idempotency_key=f"bulk-{i}",
            status=statuses[i % len(statuses)], finished_at=now if i % 5 != 3 else None,
        )
        for i in range(inputs)
    ]
    PipelineInput.objects.bulk_create(objs, batch_size=500)
    steps, records = [], []
    for i, pipeline_input in enumerate(objs):
        for position, name in enumerate(["preprocess", "sentiment", "summarise"]):
            status = {
                InputStatus.SUCCEEDED: StepStatus.SUCCEEDED,
                InputStatus.FAILED: StepStatus.FAILED if position == 0 else StepStatus.PENDING,
                InputStatus.RUNNING: StepStatus.RUNNING if position == 0 else StepStatus.PENDING,
                InputStatus.CANCELLED: StepStatus.CANCELLED,
            }[pipeline_input.status]
            steps.append(StepRun(input=pipeline_input, step=name, position=position, status=status, attempts_used=1 if position == 0 else 0,
                                 last_error="ConnectionError: " + "y" * 400 if status == StepStatus.FAILED else ""))
            if position == 0:
                record_status = {StepStatus.SUCCEEDED: RecordStatus.COMPLETED, StepStatus.FAILED: RecordStatus.FAILED,
                                 StepStatus.RUNNING: RecordStatus.PROCESSING}.get(status)
                if record_status:
                    records.append(IdempotencyRecord(
                        scope="step", key=f"{pipeline_input.pk}:{name}", operation=f"step:{name}", fingerprint="f" * 64,
                        status=record_status, attempt_count=1,
                        lease_expires_at=(now + timedelta(seconds=30 if i % 2 else -30)) if record_status == RecordStatus.PROCESSING else None,
                        completed_at=now if record_status == RecordStatus.COMPLETED else None, expires_at=now + timedelta(days=1),
                    ))
    StepRun.objects.bulk_create(steps, batch_size=1000)
    IdempotencyRecord.objects.bulk_create(records, batch_size=1000)
    records = list(IdempotencyRecord.objects.filter(scope="step"))
    attempt_status = {RecordStatus.COMPLETED: AttemptStatus.SUCCEEDED, RecordStatus.FAILED: AttemptStatus.FAILED,
                      RecordStatus.PROCESSING: AttemptStatus.RUNNING}
    attempts = []
    for j, record in enumerate(records):
        attempts.append(Attempt(record=record, number=1, status=attempt_status[record.status], worker=f"host-{j % 3}:{100 + j % 7}",
                                started_at=now - timedelta(minutes=j % 600), finished_at=None if record.status == RecordStatus.PROCESSING else now,
                                error_type="ConnectionError" if record.status == RecordStatus.FAILED else "",
                                error_message="z" * 500 if record.status == RecordStatus.FAILED else "",
                                traceback="Traceback...\n" * 40 if record.status == RecordStatus.FAILED else "",
                                details={"latency_ms": j % 900, "tokens": j % 50}))
        if j % 4 == 0:  # a late attempt: fenced, and an unknown outcome before it
            attempts.append(Attempt(record=record, number=0 if False else 100 + j, status=AttemptStatus.FENCED if j % 8 == 0 else AttemptStatus.UNKNOWN,
                                    worker="host-late:1", started_at=now - timedelta(minutes=j % 600), finished_at=now))
    Attempt.objects.bulk_create(attempts, batch_size=1000)
    return {"inputs": len(objs), "steps": len(steps), "records": len(records), "attempts": len(attempts)}
