"""verify_integrity: clean after real runs, and catching each violation we can honestly construct."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django_q.models import OrmQ

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.integrity import integrity_check
from pipeline_ops.models import StepOutput, StepRun
from pipeline_ops.reconciler import reconcile_once
from pipeline_ops.services.inputs import input_submit

from .conftest import drain

# Single-threaded: the test's transaction is enough (and much cheaper than a flush).
pytestmark = pytest.mark.django_db

HOUR_LATER = timedelta(hours=1)


def finished_input():
    pipeline_input = input_submit(pipeline="default", payload={"text": "All good here. Nothing to add."}, scope="tests").input
    drain()
    return pipeline_input


def test_verify_integrity_is_clean_when_pipelines_ran(capsys):
    finished_input()
    call_command("verify_integrity")
    assert "integrity ok" in capsys.readouterr().out
    assert integrity_check(now=timezone.now() + HOUR_LATER).ok


def test_second_output_for_a_step_is_refused_by_the_database():
    pipeline_input = finished_input()
    output = StepOutput.objects.filter(input=pipeline_input).first()
    other_run = StepRun.objects.filter(input=pipeline_input).exclude(pk=output.step_run_id).first()
    with pytest.raises(IntegrityError), transaction.atomic():
        StepOutput.objects.create(step_run=other_run, input=pipeline_input, step=output.step, output={"dup": True})


def test_verify_integrity_fails_when_a_completed_step_lost_its_output():
    pipeline_input = finished_input()
    StepOutput.objects.filter(input=pipeline_input, step="sentiment").delete()

    report = integrity_check()
    assert report.counts["completed_without_output"] == 1
    with pytest.raises(CommandError, match="completed_without_output"):
        call_command("verify_integrity")


def test_verify_integrity_fails_when_a_fenced_attempts_output_survived():
    pipeline_input = finished_input()
    output = StepOutput.objects.get(input=pipeline_input, step="summarise")
    Attempt.objects.filter(pk=output.attempt_id).update(status=AttemptStatus.FENCED)

    assert integrity_check().counts["fenced_output"] == 1


def test_verify_integrity_fails_when_an_output_has_no_completed_record():
    pipeline_input = finished_input()
    output = StepOutput.objects.get(input=pipeline_input, step="preprocess")
    IdempotencyRecord.objects.filter(attempts=output.attempt_id).update(status=RecordStatus.FAILED)

    report = integrity_check()
    assert report.counts["output_without_completed"] == 1


def test_verify_integrity_fails_when_input_is_stuck_with_no_live_work(capsys):
    input_submit(pipeline="default", payload={"text": "Lost in the queue."}, scope="tests")
    OrmQ.objects.all().delete()

    assert integrity_check().ok  # young: still within the grace period
    report = integrity_check(now=timezone.now() + HOUR_LATER)
    assert report.counts["stuck_inputs"] == 1

    with pytest.raises(CommandError):
        call_command("verify_integrity", "--json", "--grace", "0")
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["counts"]["stuck_inputs"] == 1

    reconcile_once(now=timezone.now() + HOUR_LATER)  # the reconciler puts it back in motion
    assert integrity_check(now=timezone.now() + timedelta(seconds=30)).ok


def test_verify_integrity_fails_when_record_is_processing_long_past_its_lease(test_steps, pipeline):
    class WorkerKilled(BaseException):
        pass

    def dies(ctx):
        raise WorkerKilled()

    test_steps("dies", dies)
    input_submit(pipeline=pipeline("dies_pipe", ["dies"]), payload={"text": "x"}, scope="tests")
    with pytest.raises(WorkerKilled):
        drain()

    report = integrity_check(now=timezone.now() + HOUR_LATER)
    assert report.counts["stale_records"] == 1 and report.counts["stuck_inputs"] == 1


def test_verify_integrity_refuses_bad_arguments():
    with pytest.raises(CommandError, match="--limit"):
        call_command("verify_integrity", "--limit", "0")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_verify_integrity_reads_in_a_read_only_snapshot_when_on_postgresql(monkeypatch):
    from django.db import connection

    from pipeline_ops import integrity

    finished_input()
    seen = {}
    original = integrity._stuck_inputs

    def look_then_check(report, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SHOW transaction_read_only")
            seen["read_only"] = cursor.fetchone()[0]
            cursor.execute("SHOW transaction_isolation")
            seen["isolation"] = cursor.fetchone()[0]
        return original(report, **kwargs)

    monkeypatch.setattr(integrity, "_stuck_inputs", look_then_check)
    assert integrity_check().ok
    assert seen == {"read_only": "on", "isolation": "repeatable read"}
