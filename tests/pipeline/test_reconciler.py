"""The reconciler re-enqueues each kind of stalled step exactly once, and nothing else."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_q.models import OrmQ, Schedule

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.models import StepRun
from pipeline_ops.reconciler import SCHEDULE_FUNC, SCHEDULE_NAME, reconcile_once, reconcile_schedule_install
from pipeline_ops.services.inputs import input_cancel, input_submit
from pipeline_ops.services.steps import Outcome
from pipeline_ops.states import StepStatus
from pipeline_ops.steps import TransientStepError

from .conftest import drain, queued_ids

# Single-threaded: the test's transaction is enough (and much cheaper than a flush).
pytestmark = pytest.mark.django_db


class WorkerKilled(BaseException):
    """Stands in for SIGKILL mid-step: nothing after the raise runs, as in a dead worker."""


def submit(pipeline="default"):
    return input_submit(pipeline=pipeline, payload={"text": "Fine words. Good words. Kind words."}, scope="tests").input


def test_lost_message_is_enqueued_again_when_queue_has_no_task_for_it():
    pipeline_input = submit()
    first = StepRun.objects.get(input=pipeline_input, position=0)
    later = timezone.now() + timedelta(seconds=61)
    assert reconcile_once(now=later).lost == []  # its task is still on the queue: not lost

    OrmQ.objects.all().delete()  # e.g. a Redis broker lost it in a crash
    assert reconcile_once().lost == []  # within the grace period
    report = reconcile_once(now=later)

    assert report.lost == [first.pk]
    assert queued_ids() == [first.pk]
    assert reconcile_once(now=later).enqueued == 0  # enqueued_at moved: a second pass sends nothing
    assert [outcome for _, outcome in drain()] == [Outcome.SUCCEEDED] * 3


def test_expired_lease_is_enqueued_again_when_worker_died_mid_step(test_steps, pipeline):
    def dies_once(ctx):
        if ctx.attempt_number == 1:
            raise WorkerKilled()
        return {"survived": ctx.attempt_number}

    test_steps("dies_once", dies_once, lease_seconds=30)
    pipeline_input = submit(pipeline("dies_pipe", ["dies_once"]))
    run = StepRun.objects.get(input=pipeline_input)
    with pytest.raises(WorkerKilled):
        drain()
    run.refresh_from_db()
    assert run.status == StepStatus.RUNNING and run.idempotency_record.status == RecordStatus.PROCESSING
    assert queued_ids() == []

    assert reconcile_once().enqueued == 0  # the lease is still alive
    after_lease = timezone.now() + timedelta(seconds=120)
    report = reconcile_once(now=after_lease)

    assert report.expired_leases == [run.pk]
    assert queued_ids() == [run.pk]
    assert drain(now=after_lease) == [(run.pk, Outcome.SUCCEEDED)]
    statuses = list(Attempt.objects.filter(record__key=run.idempotency_key).order_by("number").values_list("status", flat=True))
    assert statuses == [AttemptStatus.TIMED_OUT, AttemptStatus.SUCCEEDED]
    run.refresh_from_db()
    assert run.attempts_used == 2


def test_running_step_whose_key_was_deleted_is_enqueued_again_and_finishes(test_steps, pipeline):
    def dies_once(ctx):
        if ctx.attempt_number == 1 and not ctx.payload.get("recovered"):
            raise WorkerKilled()
        return {"attempt": ctx.attempt_number}

    test_steps("dies_once", dies_once, lease_seconds=30)
    pipeline_input = submit(pipeline("gone_pipe", ["dies_once"]))
    run = StepRun.objects.get(input=pipeline_input)
    with pytest.raises(WorkerKilled):
        drain()
    IdempotencyRecord.objects.filter(scope="step", key=run.idempotency_key).delete()  # an operator in the admin
    run.refresh_from_db()
    assert run.status == StepStatus.RUNNING and run.idempotency_record_id is None
    pipeline_input.payload = {**pipeline_input.payload, "recovered": True}
    pipeline_input.save(update_fields=["payload"])
    later = timezone.now() + timedelta(seconds=61)  # past the enqueue grace, not past any lease

    report = reconcile_once(now=later)

    assert report.expired_leases == [run.pk]
    assert [outcome for _, outcome in drain(now=later)] == [Outcome.SUCCEEDED]
    run.refresh_from_db()
    assert run.status == StepStatus.SUCCEEDED
    assert reconcile_once(now=later + timedelta(seconds=61)).enqueued == 0


@pytest.fixture
def redis_broker(monkeypatch, settings):
    """The real Redis broker on 127.0.0.1, on a queue of this test's own."""
    import uuid

    from django_q.conf import Conf

    from pipeline_ops.queueing import process_broker

    monkeypatch.setattr(Conf, "ORM", None)
    monkeypatch.setattr(Conf, "BROKER_CLASS", None)  # on PostgreSQL the configured broker is a broker_class
    monkeypatch.setattr(Conf, "REDIS", "redis://127.0.0.1:6379/0")
    monkeypatch.setattr(Conf, "CLUSTER_NAME", f"pipeline_ops_reconcile_{uuid.uuid4().hex[:8]}")
    settings.PIPELINE_OPS_BROKER = "redis"
    process_broker.cache_clear()
    broker = process_broker()
    yield broker
    broker.delete_queue()
    process_broker.cache_clear()


def test_redis_message_still_waiting_is_never_sent_again_and_a_lost_one_is_once(redis_broker, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        pipeline_input = submit()
    first = StepRun.objects.get(input=pipeline_input, position=0)
    assert redis_broker.queue_size() == 1
    later = timezone.now() + timedelta(seconds=61)  # past the lost grace

    for _ in range(3):  # three passes while the message waits behind a long queue
        with django_capture_on_commit_callbacks(execute=True):
            assert reconcile_once(now=later).lost == []
    assert redis_broker.queue_size() == 1  # one outstanding message, not four

    redis_broker.purge_queue()  # Redis forgot it (popped by a cluster that then died)
    with django_capture_on_commit_callbacks(execute=True):
        assert reconcile_once(now=later).lost == [first.pk]
    with django_capture_on_commit_callbacks(execute=True):
        assert reconcile_once(now=later + timedelta(seconds=61)).lost == []
    assert redis_broker.queue_size() == 1


def test_unreadable_redis_queue_defers_the_lost_check_instead_of_resending_everything(redis_broker, monkeypatch,
                                                                                    django_capture_on_commit_callbacks):
    import socket

    from django_q.conf import Conf

    from pipeline_ops.queueing import process_broker

    with django_capture_on_commit_callbacks(execute=True):
        pipeline_input = submit()
    first = StepRun.objects.get(input=pipeline_input, position=0)
    with socket.socket() as sock:  # a port nobody listens on: Redis is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(Conf, "REDIS", f"redis://127.0.0.1:{port}/0")
    process_broker.cache_clear()
    later = timezone.now() + timedelta(seconds=61)

    report = reconcile_once(now=later)

    assert report.lost == [] and any("queue unreadable" in note for note in report.notes), report.notes
    first.refresh_from_db()
    assert first.status == StepStatus.QUEUED and first.enqueued_at < later  # nothing was re-sent or moved


def test_due_retry_is_enqueued_once_when_two_reconcilers_run(test_steps, pipeline):
    def flaky(ctx):
        if ctx.attempt_number == 1:
            raise TransientStepError("try again")
        return {}

    test_steps("flaky", flaky)
    pipeline_input = submit(pipeline("retry_pipe", ["flaky"]))
    drain()
    run = StepRun.objects.get(input=pipeline_input)
    assert run.status == StepStatus.RETRY_WAIT

    first, second = reconcile_once(), reconcile_once()

    assert first.due_retries == [run.pk] and second.enqueued == 0
    assert queued_ids() == [run.pk]


def test_dry_run_changes_nothing_when_work_is_due():
    submit()
    OrmQ.objects.all().delete()
    later = timezone.now() + timedelta(seconds=61)
    report = reconcile_once(now=later, dry_run=True)
    assert len(report.lost) == 1 and queued_ids() == []
    assert reconcile_once(now=later).lost == report.lost


def test_cancelled_input_is_never_enqueued_again():
    pipeline_input = submit()
    OrmQ.objects.all().delete()
    input_cancel(pipeline_input=pipeline_input)
    assert reconcile_once(now=timezone.now() + timedelta(hours=2)).enqueued == 0


def test_reconcile_command_reports_json_when_run_once(capsys):
    submit()
    OrmQ.objects.all().delete()
    call_command("reconcile", "--once", "--json", "--grace", "0")
    report = json.loads(capsys.readouterr().out)
    assert report["enqueued"] == 1 and len(report["lost"]) == 1


def test_reconcile_command_refuses_bad_interval():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--interval must be positive"):
        call_command("reconcile", "--interval", "0")


def test_schedule_install_is_idempotent_when_run_twice():
    Schedule.objects.filter(name=SCHEDULE_NAME).delete()
    assert reconcile_schedule_install() is True
    assert reconcile_schedule_install() is False
    (schedule,) = Schedule.objects.filter(name=SCHEDULE_NAME)
    assert schedule.func == SCHEDULE_FUNC and schedule.schedule_type == Schedule.MINUTES and schedule.minutes == 1


def test_step_left_running_on_a_failed_record_is_settled_when_worker_died_after_fail(test_steps, pipeline):
    from idempotency import guard
    from idempotency.policy import NO_RETRY

    def fine(ctx):
        return {}

    test_steps("fine", fine)
    pipeline_input = submit(pipeline("crash_pipe", ["fine"]))
    run = StepRun.objects.get(input=pipeline_input)
    OrmQ.objects.all().delete()
    # What a worker had done when it died: claimed, moved the step to RUNNING, failed the key for good.
    from pipeline_ops.services.steps import step_fingerprint

    claimed = guard.claim(scope="step", key=run.idempotency_key, operation="step:fine",
                          fingerprint=step_fingerprint(pipeline="crash_pipe", step="fine", payload=pipeline_input.payload, outputs={}))
    StepRun.objects.filter(pk=run.pk).update(status=StepStatus.RUNNING, idempotency_record=claimed.record)
    guard.fail(attempt=claimed.attempt, error=RuntimeError("boom"), policy=NO_RETRY)

    later = timezone.now() + timedelta(seconds=61)
    assert reconcile_once(now=later).expired_leases == [run.pk]
    assert drain() == [(run.pk, Outcome.FAILED)]
    run.refresh_from_db()
    pipeline_input.refresh_from_db()
    assert run.status == StepStatus.FAILED and pipeline_input.status == "FAILED"


def test_poison_step_is_dead_lettered_when_it_kills_every_worker(test_steps, pipeline):
    def poison(ctx):
        raise WorkerKilled()

    test_steps("poison", poison, max_attempts=2)
    pipeline_input = submit(pipeline("poison_pipe", ["poison"]))
    run = StepRun.objects.get(input=pipeline_input)
    clock = timezone.now()
    with pytest.raises(WorkerKilled):
        drain()
    clock += timedelta(minutes=5)
    assert reconcile_once(now=clock).expired_leases == [run.pk]
    with pytest.raises(WorkerKilled):
        drain(now=clock)  # attempt 2 takes over attempt 1's expired lease, and dies too
    clock += timedelta(minutes=5)
    assert reconcile_once(now=clock).expired_leases == [run.pk]

    assert drain(now=clock) == [(run.pk, Outcome.FAILED)]  # crashes count: no third start
    run.refresh_from_db()
    assert run.status == StepStatus.FAILED and run.attempts_used == 2 and "2 attempts started" in run.last_error
    statuses = list(Attempt.objects.filter(record__key=run.idempotency_key).values_list("status", flat=True))
    assert statuses == [AttemptStatus.TIMED_OUT, AttemptStatus.TIMED_OUT]


@pytest.mark.django_db(transaction=True)
def test_reconcile_command_loops_until_sigterm_when_run_as_a_process():
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from django.db import connection

    pipeline_input = submit()
    OrmQ.objects.all().delete()  # its first task is lost
    first = StepRun.objects.get(input=pipeline_input, position=0)
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        url = f"sqlite:///{db['NAME']}"
    else:
        url = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "reconcile", "--interval", "0.2", "--grace", "0", "--json", "--skip-checks"],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": url},
    )
    try:
        passes = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert passes[0]["lost"] == [first.pk]
    # Later passes see its task on the queue: sent once, not once per pass.
    assert sum(p["enqueued"] for p in passes) == 1 and queued_ids() == [first.pk]
