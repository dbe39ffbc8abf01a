"""The operator services' rules, on real SQLite and PostgreSQL, with the real guard and runner."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction
from django.test import override_settings
from django.utils import timezone
from django_q.models import OrmQ

from idempotency import guard
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.reconciler import reconcile_once
from pipeline_ops.models import OperatorAction, PipelineInput, StepOutput, StepRun
from pipeline_ops.services import operations
from pipeline_ops.states import InputStatus, StepStatus
from pipeline_ops.tasks import step_run_execute_task

from .helpers import claim_step, failed_input, first_step, make_stuck, operator, submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(db):
    return operator("alice", "retry_steprun", "force_retry_steprun", "release_lease_steprun", "cancel_pipelineinput")


def run_until_terminal(pipeline_input: PipelineInput, *, limit: int = 10) -> PipelineInput:
    """Be the worker: execute whatever step of the input is queued until the input is terminal."""
    for _ in range(limit):
        pipeline_input.refresh_from_db()
        if pipeline_input.status in (InputStatus.SUCCEEDED, InputStatus.FAILED, InputStatus.CANCELLED):
            return pipeline_input
        queued = StepRun.objects.filter(input=pipeline_input, status=StepStatus.QUEUED).order_by("position").first()
        assert queued is not None, list(StepRun.objects.filter(input=pipeline_input).values_list("step", "status"))
        step_run_execute_task(queued.pk)
    pipeline_input.refresh_from_db()
    return pipeline_input


def test_retry_queues_the_step_and_audits_it_when_the_step_failed(alice):
    pipeline_input, step_run, attempt = failed_input()
    queued_before = OrmQ.objects.count()

    report = operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="provider is back", source="admin")

    assert (report.done, report.skipped_total, report.message) == (1, 0, "1 queued")
    step_run.refresh_from_db()
    pipeline_input.refresh_from_db()
    record = IdempotencyRecord.objects.get(pk=attempt.record_id)
    assert step_run.status == StepStatus.QUEUED
    assert pipeline_input.status == InputStatus.RUNNING
    assert record.status == RecordStatus.FAILED and record.retry_at is not None and record.retry_at <= timezone.now()
    assert OrmQ.objects.count() == queued_before + 1  # the ORM broker's row, in the same transaction
    audit = OperatorAction.objects.get()
    assert (audit.actor, audit.actor_name, audit.action, audit.outcome, audit.target_type, audit.target_id, audit.reason) == (
        alice, "alice", "retry", "done", "step_run", str(step_run.pk), "provider is back",
    )
    assert audit.before["step_status"] == "FAILED" and audit.after["step_status"] == "QUEUED"
    assert audit.before["input_status"] == "FAILED" and audit.after["input_status"] == "RUNNING"


def test_retried_input_succeeds_when_the_worker_runs_it(alice):
    pipeline_input, step_run, _ = failed_input()
    operations.input_retry(pipeline_input=pipeline_input, actor=alice, reason="outage over", source="api")

    pipeline_input = run_until_terminal(pipeline_input)

    assert pipeline_input.status == InputStatus.SUCCEEDED
    assert StepOutput.objects.filter(input=pipeline_input).count() == 3
    attempts = list(Attempt.objects.filter(record__key=step_run.idempotency_key).order_by("number").values_list("number", "status"))
    assert attempts == [(1, AttemptStatus.FAILED), (2, AttemptStatus.SUCCEEDED)]


def test_retry_skips_with_the_winning_attempt_when_the_step_completed(alice):
    pipeline_input, step_run, _ = failed_input()
    operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="first", source="admin")
    run_until_terminal(pipeline_input)
    OperatorAction.objects.all().delete()

    report = operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="again", source="admin")

    assert report.done == 0
    assert report.message == "0 queued, 1 skipped: already completed by attempt #2"
    assert Attempt.objects.filter(record__key=step_run.idempotency_key).count() == 2
    audit = OperatorAction.objects.get()
    assert (audit.outcome, audit.message) == ("skipped", "already completed by attempt #2")


def test_retry_is_refused_when_a_live_attempt_holds_the_lease(alice):
    pipeline_input = submit()
    step_run = first_step(pipeline_input)
    attempt = claim_step(step_run, worker="gpu-7:4242", lease_seconds=300)

    plan = operations.step_runs_retry_plan(step_runs=[step_run])
    report = operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="impatient", source="admin")

    assert [d.acts for d in plan] == [False]
    assert plan[0].reason.startswith("running on worker gpu-7:4242 until ")
    assert report.done == 0 and report.skipped == {"running": 1}
    assert "1 skipped: running on worker gpu-7:4242 until" in report.message
    attempt.refresh_from_db()
    assert attempt.status == AttemptStatus.RUNNING
    assert IdempotencyRecord.objects.get(pk=attempt.record_id).status == RecordStatus.PROCESSING


def test_forced_retry_fences_the_live_attempt_when_it_completes_late(alice):
    pipeline_input = submit()
    step_run = first_step(pipeline_input)
    old = claim_step(step_run, worker="gpu-7:4242", lease_seconds=300)

    report = operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="worker wedged", source="admin", force=True)
    assert report.done == 1 and report.decisions[0].kind == "forced"
    old.refresh_from_db()
    assert old.status == AttemptStatus.TIMED_OUT
    assert OperatorAction.objects.get().action == "force_retry"

    # The new attempt runs and wins; then the old one finally tries to write its result.
    run_until_terminal(pipeline_input)
    late = guard.complete(
        attempt=old, result={"late": True},
        write=lambda: StepOutput.objects.create(step_run=step_run, input=pipeline_input, step=step_run.step, attempt=old, output={"late": True}),
    )

    assert late.fenced
    old.refresh_from_db()
    assert old.status == AttemptStatus.FENCED
    assert StepOutput.objects.filter(input=pipeline_input, step=step_run.step).count() == 1
    assert StepOutput.objects.get(input=pipeline_input, step=step_run.step).output != {"late": True}


def test_stuck_step_is_released_and_retried_when_its_lease_expired(alice):
    pipeline_input = submit()
    step_run = first_step(pipeline_input)
    dead = make_stuck(step_run)

    report = operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="worker died", source="cli")

    assert report.done == 1 and report.decisions[0].kind == "stuck"
    dead.refresh_from_db()
    assert dead.status == AttemptStatus.TIMED_OUT
    assert run_until_terminal(pipeline_input).status == InputStatus.SUCCEEDED


def test_retry_skips_cancelled_and_not_started_steps_when_mixed(alice):
    cancelled = submit()
    operations.inputs_cancel(inputs=[cancelled], actor=alice, reason="duplicate upload", source="admin")
    _, failed_step, _ = failed_input()
    waiting = StepRun.objects.get(input=submit(), position=1)  # PENDING: earlier step not done

    report = operations.step_runs_retry(
        step_runs=[first_step(cancelled), failed_step, waiting], actor=alice, reason="sweep", source="admin"
    )

    assert report.done == 1
    assert dict(report.skipped) == {"cancelled": 1, "not_started": 1}
    assert report.message == "1 queued, 2 skipped: cancelled; not started yet (waiting for earlier steps)"
    assert OperatorAction.objects.filter(batch=report.batch).count() == 3


def _queue_refuses_tasks() -> None:
    """A real failure at the last moment: the database refuses django-q2's queue row (the ORM
    broker's enqueue is an INSERT in the retry's own transaction). Undone with the test's
    transaction: DDL is transactional on SQLite and PostgreSQL."""
    table = OrmQ._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(f"CREATE TRIGGER queue_refuses BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'queue refused'); END")
        else:
            cursor.execute("CREATE FUNCTION queue_refuses() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'queue refused'; END $$ LANGUAGE plpgsql")
            cursor.execute(f"CREATE TRIGGER queue_refuses BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION queue_refuses()")


def test_no_move_and_no_audit_row_when_the_enqueue_fails(alice):
    """The audit row is written in the transaction of the change: a failure at the last moment
    (the broker refusing the task) rolls back the guard's reopen, the step's move and the row."""
    _, step_run, attempt = failed_input()
    queued_before = set(OrmQ.objects.values_list("pk", flat=True))  # the submit's own task
    _queue_refuses_tasks()

    with pytest.raises(DatabaseError, match="queue refused"):
        operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="try", source="admin")

    step_run.refresh_from_db()
    assert step_run.status == StepStatus.FAILED
    assert IdempotencyRecord.objects.get(pk=attempt.record_id).retry_at is None
    assert not OperatorAction.objects.exists()
    assert set(OrmQ.objects.values_list("pk", flat=True)) == queued_before


def test_audit_rows_commit_with_the_change_when_the_caller_rolls_back(alice):
    _, step_run, _ = failed_input()
    with transaction.atomic():
        operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="try", source="admin")
        assert OperatorAction.objects.count() == 1
        transaction.set_rollback(True)
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.FAILED and not OperatorAction.objects.exists()


@override_settings(PIPELINE_OPS_RETRY_RATE=2)
def test_bulk_retry_is_spread_out_when_a_rate_is_set(alice):
    steps = [failed_input()[1] for _ in range(4)]
    now = timezone.now()

    report = operations.step_runs_retry(step_runs=steps, actor=alice, reason="outage over", source="admin", now=now)

    assert report.done == 4 and report.message == "4 queued (spread over 2 s)"
    rows = {s.pk: s for s in StepRun.objects.filter(pk__in=[s.pk for s in steps])}
    assert [rows[s.pk].status for s in steps] == [StepStatus.QUEUED, StepStatus.RETRY_WAIT, StepStatus.RETRY_WAIT, StepStatus.RETRY_WAIT]
    assert [rows[s.pk].next_attempt_at for s in steps[1:]] == [now + timedelta(seconds=x) for x in (0.5, 1.0, 1.5)]
    # The guard itself holds the later ones back: an early delivery is told to come back.
    assert step_run_execute_task(steps[3].pk) == "in_flight"
    record = IdempotencyRecord.objects.get(key=steps[3].idempotency_key)
    assert record.retry_at == now + timedelta(seconds=1.5)
    # The reconciler sends each one when its time has come, not before.
    assert reconcile_once(now=now + timedelta(seconds=0.75)).due_retries == [steps[1].pk]
    assert reconcile_once(now=now + timedelta(seconds=2)).due_retries == [steps[2].pk, steps[3].pk]


def test_cancel_cancels_running_inputs_and_skips_finished_ones_when_mixed(alice):
    running = submit()
    live = claim_step(first_step(running), lease_seconds=300)
    done, step_run, _ = failed_input()
    operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="retry", source="admin")
    run_until_terminal(done)

    plan = operations.inputs_cancel_plan(inputs=[running, done])
    report = operations.inputs_cancel(inputs=[running, done], actor=alice, reason="customer withdrew", source="admin")

    assert [d.acts for d in plan] == [True, False]
    assert report.message == "1 cancelled, 1 skipped: already succeeded"
    running.refresh_from_db()
    assert running.status == InputStatus.CANCELLED
    assert set(StepRun.objects.filter(input=running).values_list("status", flat=True)) == {StepStatus.CANCELLED}
    live.refresh_from_db()
    assert live.status == AttemptStatus.TIMED_OUT  # its key was released: a late completion is fenced
    rows = OperatorAction.objects.filter(batch=report.batch, action="cancel")
    assert sorted(rows.values_list("outcome", flat=True)) == ["done", "skipped"]
    assert rows.get(outcome="done").after["input_status"] == "CANCELLED"


def test_release_frees_an_expired_lease_and_refuses_a_live_one(alice):
    stuck_input, live_input = submit(), submit()
    dead = make_stuck(first_step(stuck_input))
    live = claim_step(first_step(live_input), lease_seconds=300)

    report = operations.step_runs_release_lease(
        step_runs=[first_step(stuck_input), first_step(live_input)], actor=alice, reason="host lost", source="admin"
    )

    assert report.done == 1 and report.skipped == {"running": 1}
    dead.refresh_from_db()
    live.refresh_from_db()
    assert (dead.status, live.status) == (AttemptStatus.TIMED_OUT, AttemptStatus.RUNNING)
    released = first_step(stuck_input)
    assert released.status == StepStatus.RETRY_WAIT and released.next_attempt_at is not None
    record = IdempotencyRecord.objects.get(key=released.idempotency_key)
    assert record.status == RecordStatus.FAILED and record.retry_at is not None
    # The reconciler's next pass sends the due retry, and the worker runs it to the end.
    assert released.pk in reconcile_once().due_retries
    assert run_until_terminal(stuck_input).status == InputStatus.SUCCEEDED


def test_action_is_refused_when_the_reason_is_blank(alice):
    _, step_run, _ = failed_input()
    with pytest.raises(ValueError):
        operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="   ", source="admin")
    assert not OperatorAction.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_one_retry_wins_and_the_other_is_skipped_when_two_operators_click_at_once():
    """Two operators retry the same failed step at the same instant (real threads, real
    PostgreSQL connections): the row lock serialises them, the first queues it, the second finds
    it already queued. One task on the queue, two audit rows."""
    import threading

    from django.db import connection

    alice = operator("alice", "retry_steprun")
    bob = operator("bob", "retry_steprun")
    _, step_run, _ = failed_input()
    queued_before = OrmQ.objects.count()
    barrier = threading.Barrier(2)
    reports = {}

    def click(user):
        try:
            barrier.wait()
            reports[user.username] = operations.step_runs_retry(step_runs=[step_run.pk], actor=user, reason="me too", source="admin")
        finally:
            connection.close()

    threads = [threading.Thread(target=click, args=(user,)) for user in (alice, bob)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(r.done for r in reports.values()) == [0, 1]
    loser = next(r for r in reports.values() if r.done == 0)
    assert dict(loser.skipped) == {"queued": 1} and loser.message.startswith("0 queued, 1 skipped: already queued at ")
    assert OrmQ.objects.count() == queued_before + 1
    assert sorted(OperatorAction.objects.values_list("outcome", flat=True)) == ["done", "skipped"]
