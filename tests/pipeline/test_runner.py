"""The runner through its task function, on SQLite and PostgreSQL, with real ORM broker rows."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.utils import timezone

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.integrity import integrity_check
from pipeline_ops.models import PipelineInput, StepOutput, StepRun
from pipeline_ops.reconciler import reconcile_once
from pipeline_ops.services.inputs import input_cancel, input_submit
from pipeline_ops.services.steps import Outcome
from pipeline_ops.states import InputStatus, StepStatus
from pipeline_ops.steps import PermanentStepError, TransientStepError
from pipeline_ops.tasks import step_run_execute_task

from .conftest import StepThread, drain, queue_rows, queued_ids, wait_for

pytestmark = pytest.mark.django_db
# Tests with a second thread (a second worker, a heartbeat) need committed rows it can see.
threaded = pytest.mark.django_db(transaction=True)

TEXT = "The service was wonderful and the staff were kind. The food was cold, sadly. We will come back for the view."


def submit(pipeline: str = "default", text: str = TEXT, key: str = "") -> PipelineInput:
    return input_submit(pipeline=pipeline, payload={"text": text}, scope="tests", key=key).input


def steps_of(pipeline_input: PipelineInput) -> list[StepRun]:
    return list(StepRun.objects.filter(input=pipeline_input).order_by("position"))


def attempts_of(step_run: StepRun) -> list[Attempt]:
    return list(Attempt.objects.filter(record__scope="step", record__key=step_run.idempotency_key).order_by("number"))


def test_pipeline_succeeds_when_every_step_runs():
    pipeline_input = submit()
    assert queued_ids() == [steps_of(pipeline_input)[0].pk]  # the submit's transaction wrote the broker row

    ran = drain()

    assert [outcome for _, outcome in ran] == [Outcome.SUCCEEDED] * 3
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.SUCCEEDED and pipeline_input.finished_at is not None
    steps = steps_of(pipeline_input)
    assert [s.status for s in steps] == [StepStatus.SUCCEEDED] * 3
    assert [s.attempts_used for s in steps] == [1, 1, 1]
    outputs = {o.step: o for o in StepOutput.objects.filter(input=pipeline_input)}
    assert outputs["preprocess"].output["language"] == "en"
    assert outputs["sentiment"].output["label"] in {"positive", "negative", "neutral"}
    assert outputs["summarise"].output["sentences"] == 2
    for step in steps:
        assert step.idempotency_record.status == RecordStatus.COMPLETED
        assert outputs[step.step].attempt.status == AttemptStatus.SUCCEEDED
    assert integrity_check().ok


def test_next_step_queued_exactly_once_when_task_is_delivered_twice():
    pipeline_input = submit()
    first, second, _ = steps_of(pipeline_input)
    assert step_run_execute_task(first.pk) == Outcome.SUCCEEDED
    assert step_run_execute_task(first.pk) == Outcome.REPLAYED

    assert queued_ids() == [first.pk, second.pk]  # the submit's row (not acked here) and ONE for step 2
    second.refresh_from_db()
    assert second.status == StepStatus.QUEUED
    assert len(attempts_of(first)) == 1


def test_redelivered_task_is_a_no_op_when_pipeline_already_succeeded():
    pipeline_input = submit()
    drain()
    before = {o.step: (o.pk, o.output) for o in StepOutput.objects.filter(input=pipeline_input)}

    outcomes = [step_run_execute_task(step.pk) for step in steps_of(pipeline_input)]

    assert outcomes == [Outcome.REPLAYED] * 3
    assert queue_rows() == []
    assert {o.step: (o.pk, o.output) for o in StepOutput.objects.filter(input=pipeline_input)} == before
    assert Attempt.objects.filter(record__scope="step").count() == 3
    assert IdempotencyRecord.objects.filter(scope="step", replay_count=1).count() == 3


def test_redelivered_task_runs_nothing_and_keeps_the_key_forgotten_when_its_key_retention_has_passed():
    from idempotency.purge import records_purge

    pipeline_input = submit()
    drain()
    before = {o.step: (o.pk, o.output) for o in StepOutput.objects.filter(input=pipeline_input)}
    assert records_purge(now=timezone.now() + timedelta(hours=25)).forgotten == 3

    # A stale delivery meets a forgotten key: the guard treats it as new, the step (SUCCEEDED)
    # refuses to start, and the claim is rolled back whole: no attempt, the key still forgotten.
    outcomes = [step_run_execute_task(step.pk) for step in steps_of(pipeline_input)]

    assert outcomes == [Outcome.NOT_RUNNABLE] * 3
    assert {o.step: (o.pk, o.output) for o in StepOutput.objects.filter(input=pipeline_input)} == before
    assert Attempt.objects.filter(record__scope="step").count() == 3
    assert IdempotencyRecord.objects.filter(scope="step", forgotten_at__isnull=False, attempt_count=1).count() == 3
    assert queue_rows() == [] and integrity_check().ok


def test_step_retries_then_succeeds_when_first_error_is_transient(test_steps, pipeline):
    def flaky(ctx):
        if ctx.attempt_number == 1:
            raise TransientStepError("upstream hiccup")
        return {"ok": ctx.attempt_number}

    test_steps("flaky", flaky)
    pipeline_input = submit(pipeline("flaky_pipe", ["preprocess", "flaky"]))
    drain()
    _, flaky_run = steps_of(pipeline_input)
    flaky_run.refresh_from_db()
    assert flaky_run.status == StepStatus.RETRY_WAIT and "upstream hiccup" in flaky_run.last_error
    assert flaky_run.next_attempt_at is not None
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.RUNNING

    report = reconcile_once()
    assert report.due_retries == [flaky_run.pk]
    assert drain() == [(flaky_run.pk, Outcome.SUCCEEDED)]

    flaky_run.refresh_from_db()
    pipeline_input.refresh_from_db()
    assert flaky_run.status == StepStatus.SUCCEEDED and flaky_run.attempts_used == 2
    assert [a.status for a in attempts_of(flaky_run)] == [AttemptStatus.FAILED, AttemptStatus.SUCCEEDED]
    assert StepOutput.objects.get(step_run=flaky_run).output == {"ok": 2}
    assert pipeline_input.status == InputStatus.SUCCEEDED


def test_step_fails_at_once_when_input_is_invalid():
    pipeline_input = input_submit(pipeline="default", payload={"body": "no text field"}, scope="tests").input

    assert drain() == [(steps_of(pipeline_input)[0].pk, Outcome.FAILED)]

    pipeline_input.refresh_from_db()
    preprocess, sentiment, _ = steps_of(pipeline_input)
    assert pipeline_input.status == InputStatus.FAILED
    assert preprocess.status == StepStatus.FAILED and "PermanentStepError" in preprocess.last_error
    assert sentiment.status == StepStatus.PENDING
    assert [a.status for a in attempts_of(preprocess)] == [AttemptStatus.FAILED]
    assert preprocess.idempotency_record.retry_at is None
    assert reconcile_once(now=timezone.now() + timedelta(hours=1)).enqueued == 0


def test_step_fails_when_permanent_error_even_with_attempts_left(test_steps, pipeline):
    def broken(ctx):
        raise PermanentStepError("the model rejected this document")

    test_steps("broken", broken, max_attempts=5)
    pipeline_input = submit(pipeline("broken_pipe", ["broken", "preprocess"]))
    drain()
    broken_run = steps_of(pipeline_input)[0]
    broken_run.refresh_from_db()
    assert broken_run.status == StepStatus.FAILED and broken_run.attempts_used == 1


def test_step_fails_when_max_attempts_are_exhausted(test_steps, pipeline):
    def always_down(ctx):
        raise TransientStepError(f"503 on attempt {ctx.attempt_number}")

    test_steps("down", always_down, max_attempts=3)
    pipeline_input = submit(pipeline("down_pipe", ["down"]))
    outcomes = [outcome for _, outcome in drain()]
    for _ in range(5):
        if not reconcile_once().enqueued:
            break
        outcomes += [outcome for _, outcome in drain()]

    assert outcomes == [Outcome.RETRY_SCHEDULED, Outcome.RETRY_SCHEDULED, Outcome.FAILED]
    run = steps_of(pipeline_input)[0]
    pipeline_input.refresh_from_db()
    assert run.status == StepStatus.FAILED and run.attempts_used == 3 and "attempt 3" in run.last_error
    assert pipeline_input.status == InputStatus.FAILED
    assert run.idempotency_record.status == RecordStatus.FAILED and run.idempotency_record.retry_at is None


@threaded
def test_late_completion_is_fenced_when_lease_was_taken_over(test_steps, pipeline):
    release_first = threading.Event()

    def gated(ctx):
        if ctx.attempt_number == 1:
            assert release_first.wait(20), "never released"
        return {"by_attempt": ctx.attempt_number}

    test_steps("gated", gated)
    pipeline_input = submit(pipeline("gated_pipe", ["gated", "preprocess"]))
    gated_run, next_run = steps_of(pipeline_input)
    drain_rows = queue_rows()
    assert len(drain_rows) == 1  # the submit queued the first step's task, and nothing else
    first_worker = StepThread(gated_run.pk)
    first_worker.start()
    wait_for(lambda: StepRun.objects.filter(pk=gated_run.pk, status=StepStatus.RUNNING).exists(), message="attempt 1 running")

    # The first worker stalls past its lease: a redelivered task takes the key over.
    later = timezone.now() + timedelta(seconds=31)
    from pipeline_ops.services.steps import step_run_execute

    assert step_run_execute(step_run_id=gated_run.pk, now=later).outcome == Outcome.SUCCEEDED
    release_first.set()
    assert first_worker.result() == Outcome.FENCED

    output = StepOutput.objects.get(step_run=gated_run)
    assert output.output == {"by_attempt": 2}
    first, second = attempts_of(gated_run)
    assert first.status == AttemptStatus.FENCED and second.status == AttemptStatus.SUCCEEDED
    # The next step was queued once, by the winner.
    assert queued_ids().count(next_run.pk) == 1
    gated_run.refresh_from_db()
    assert gated_run.status == StepStatus.SUCCEEDED and gated_run.attempts_used == 2
    assert integrity_check().ok


@threaded
def test_running_step_is_fenced_when_input_is_cancelled(test_steps, pipeline):
    release = threading.Event()

    def gated(ctx):
        assert release.wait(20), "never released"
        return {"done": True}

    test_steps("gated", gated)
    pipeline_input = submit(pipeline("cancel_pipe", ["gated", "preprocess"]))
    gated_run, next_run = steps_of(pipeline_input)
    worker = StepThread(gated_run.pk)
    worker.start()
    wait_for(lambda: StepRun.objects.filter(pk=gated_run.pk, status=StepStatus.RUNNING).exists(), message="step running")

    assert input_cancel(pipeline_input=pipeline_input, reason="customer withdrew the document") == 2
    release.set()

    assert worker.result() == Outcome.FENCED
    assert not StepOutput.objects.filter(input=pipeline_input).exists()
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.CANCELLED
    assert [s.status for s in steps_of(pipeline_input)] == [StepStatus.CANCELLED, StepStatus.CANCELLED]
    assert [a.status for a in attempts_of(gated_run)] == [AttemptStatus.FENCED]
    # A redelivered task does nothing for a cancelled input, and nothing queues the next step.
    assert step_run_execute_task(gated_run.pk) == Outcome.CANCELLED
    assert next_run.pk not in queued_ids()
    assert reconcile_once(now=timezone.now() + timedelta(hours=1)).enqueued == 0


def test_queued_step_never_runs_when_input_is_cancelled_before_it_starts():
    pipeline_input = submit()
    assert input_cancel(pipeline_input=pipeline_input) == 3
    assert input_cancel(pipeline_input=pipeline_input) == 0

    assert [outcome for _, outcome in drain()] == [Outcome.CANCELLED]
    assert not IdempotencyRecord.objects.filter(scope="step").exists()


def test_claim_is_rolled_back_when_input_is_cancelled_between_read_and_claim(monkeypatch):
    """The runner reads the step as QUEUED, then an operator cancels, then the runner claims: the
    step's RUNNING move fails inside the claim's transaction, so no attempt and no record remain."""
    from pipeline_ops.services import steps as steps_service

    pipeline_input = submit()
    real_read = steps_service._step_run_read

    def read_then_a_cancel(**kwargs):
        step_run = real_read(**kwargs)
        input_cancel(pipeline_input=pipeline_input)
        return step_run

    monkeypatch.setattr(steps_service, "_step_run_read", read_then_a_cancel)
    first = StepRun.objects.get(input=pipeline_input, position=0)

    assert step_run_execute_task(first.pk) == Outcome.CANCELLED
    assert not IdempotencyRecord.objects.filter(scope="step").exists()
    assert not Attempt.objects.exists()
    assert set(StepRun.objects.filter(input=pipeline_input).values_list("status", flat=True)) == {StepStatus.CANCELLED}


@threaded
def test_heartbeat_keeps_lease_when_step_outlives_a_third_of_it(test_steps, pipeline):
    def patient(ctx):
        # Work until the runner's heartbeat has extended the lease at least once.
        wait_for(lambda: Attempt.objects.filter(record__key=ctx.idempotency_key, heartbeat_at__isnull=False).exists(),
                 message="a heartbeat")
        return {"patient": True}

    test_steps("patient", patient, lease_seconds=0.6)
    pipeline_input = submit(pipeline("patient_pipe", ["patient"]))
    assert [outcome for _, outcome in drain()] == [Outcome.SUCCEEDED]
    run = steps_of(pipeline_input)[0]
    assert attempts_of(run)[0].heartbeat_at is not None


@threaded
def test_fenced_step_stops_when_heartbeat_is_refused(test_steps, pipeline):
    def cooperative(ctx):
        if ctx.attempt_number == 1:
            wait_for(lambda: ctx.stop_requested, message="the stop signal")
            ctx.raise_if_stopped()
        return {"attempt": ctx.attempt_number}

    test_steps("cooperative", cooperative, lease_seconds=0.6)
    pipeline_input = submit(pipeline("coop_pipe", ["cooperative"]))
    run = steps_of(pipeline_input)[0]
    worker = StepThread(run.pk)
    worker.start()
    wait_for(lambda: Attempt.objects.filter(record__key=run.idempotency_key, number=1, heartbeat_at__isnull=False).exists(),
             message="attempt 1 heartbeating")
    from pipeline_ops.services.steps import step_run_execute

    assert step_run_execute(step_run_id=run.pk, now=timezone.now() + timedelta(seconds=5)).outcome == Outcome.SUCCEEDED

    assert worker.result() == Outcome.SUPERSEDED
    first, second = attempts_of(run)
    assert first.error_type == "StepStoppedError" and second.status == AttemptStatus.SUCCEEDED
    assert StepOutput.objects.get(step_run=run).output == {"attempt": 2}


@threaded
def test_step_runs_once_when_many_workers_get_the_same_task_at_once():
    pipeline_input = submit()
    first, second, _ = steps_of(pipeline_input)
    barrier = threading.Barrier(6)

    class Racer(StepThread):
        def run(self):
            barrier.wait(10)
            super().run()

    racers = [Racer(first.pk) for _ in range(6)]
    for racer in racers:
        racer.start()
    outcomes = sorted(racer.result() for racer in racers)

    assert outcomes.count(Outcome.SUCCEEDED) == 1
    assert set(outcomes) <= {Outcome.SUCCEEDED, Outcome.IN_FLIGHT, Outcome.REPLAYED}
    assert StepOutput.objects.filter(step_run=first).count() == 1
    assert len(attempts_of(first)) == 1
    assert queued_ids().count(second.pk) == 1
