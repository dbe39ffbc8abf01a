"""``retry_failed`` and ``pipeline_status`` against real steps run by the real runner."""
from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_q.models import OrmQ

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.models import OperatorAction, PipelineInput, StepRun
from pipeline_ops.states import StepStatus

pytestmark = pytest.mark.django_db


def call(name: str, *args) -> str:
    out = io.StringIO()
    call_command(name, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def retry_json(*args) -> dict:
    return json.loads(call("retry_failed", "--json", *args))


# --- retry_failed -------------------------------------------------------------------------------


def test_dry_run_lists_what_would_be_retried_and_changes_nothing_when_steps_failed(world):
    before = list(StepRun.objects.order_by("pk").values_list("pk", "status", "updated_at"))
    queue_before = OrmQ.objects.count()

    result = retry_json("--reason", "provider back", "--dry-run")

    assert result["dry_run"] is True and result["matched"] == 3 and result["queued"] == 3
    assert result["message"] == "3 would be queued"
    assert {row["step"] for row in result["step_runs"]} == {"ops_boom", "ops_value"}
    assert all(row["acts"] and row["kind"] == "failed" for row in result["step_runs"])
    assert list(StepRun.objects.order_by("pk").values_list("pk", "status", "updated_at")) == before
    assert OrmQ.objects.count() == queue_before
    assert OperatorAction.objects.count() == 0


@pytest.mark.parametrize(
    "args, expected_steps",
    [
        (["--pipeline", "ops_boom"], ["ops_boom", "ops_boom"]),
        (["--step", "ops_value"], ["ops_value"]),
        (["--error-type", "ValueError"], ["ops_value"]),
        (["--error-type", "OpsBoomError"], ["ops_boom", "ops_boom"]),
        (["--error-type", "ReadTimeout"], []),
        (["--since", "1h"], ["ops_boom", "ops_boom", "ops_value"]),
        (["--pipeline", "ops_boom", "--limit", "1"], ["ops_boom"]),
        (["--pipeline", "default"], []),
    ],
)
def test_filters_narrow_the_failed_steps_when_given(world, args, expected_steps):
    result = retry_json("--reason", "r", "--dry-run", *args)

    assert sorted(row["step"] for row in result["step_runs"]) == expected_steps
    assert result["matched"] == len(expected_steps)


def test_since_in_the_future_matches_nothing_when_failures_are_older(world):
    later = (timezone.now() + timedelta(minutes=5)).isoformat()
    assert retry_json("--reason", "r", "--dry-run", "--since", later)["matched"] == 0
    assert "no failed step runs match" in call("retry_failed", "--reason", "r", "--since", later)


def test_retry_queues_failed_steps_and_writes_one_audit_row_each_when_run(world):
    out = call("retry_failed", "--reason", "model provider recovered", "--pipeline", "ops_boom", "--rate", "0")

    assert "2 matched; 2 queued." in out
    steps = StepRun.objects.filter(input__in=world.boom)
    assert set(steps.values_list("status", flat=True)) == {StepStatus.QUEUED}
    queued_ids = {q.task["args"][0] for q in OrmQ.objects.all()}
    assert set(steps.values_list("pk", flat=True)) <= queued_ids
    assert set(PipelineInput.objects.filter(pk__in=[i.pk for i in world.boom]).values_list("status", flat=True)) == {"RUNNING"}
    actions = list(OperatorAction.objects.order_by("target_id"))
    assert len(actions) == 2
    assert {a.target_id for a in actions} == {str(pk) for pk in steps.values_list("pk", flat=True)}
    for action in actions:
        assert (action.source, action.action, action.outcome, action.reason, action.target_type) == (
            "cli", "retry", "done", "model provider recovered", "step_run",
        )
        assert action.actor is None and "@" in action.actor_name
        assert action.before["step_status"] == "FAILED" and action.after["step_status"] == "QUEUED"
    assert len({a.batch for a in actions}) == 1
    assert f"Audit batch {actions[0].batch}" in out
    # The other failure is untouched.
    assert StepRun.objects.get(input=world.value[0]).status == StepStatus.FAILED


def test_retried_step_runs_again_through_the_runner_when_the_task_is_delivered(world, settings):
    """After the retry, the delivered task claims attempt #2 (it fails again: the test step always does)."""
    from pipeline_ops.tasks import step_run_execute_task

    call("retry_failed", "--reason", "again", "--step", "ops_value", "--rate", "0")
    step_run = StepRun.objects.get(input=world.value[0])

    assert step_run_execute_task(step_run.pk) == "failed"
    assert Attempt.objects.filter(record__key=step_run.idempotency_key).count() == 2


def test_rate_spreads_retries_when_rate_is_given(world):
    result = retry_json("--reason", "slowly", "--rate", "1")

    assert result["queued"] == 3 and result["spread_seconds"] == pytest.approx(2.0)
    statuses = sorted(StepRun.objects.filter(pk__in=[r["id"] for r in result["step_runs"]]).values_list("status", flat=True))
    assert statuses == [StepStatus.QUEUED, StepStatus.RETRY_WAIT, StepStatus.RETRY_WAIT]
    waiting = StepRun.objects.filter(status=StepStatus.RETRY_WAIT).order_by("next_attempt_at")
    gap = (waiting[1].next_attempt_at - waiting[0].next_attempt_at).total_seconds()
    assert gap == pytest.approx(1.0, abs=0.01)


def test_retry_records_the_named_user_when_user_is_given(world, django_user_model):
    operator = django_user_model.objects.create_user(username="oncall")

    call("retry_failed", "--reason", "r", "--step", "ops_value", "--user", "oncall", "--rate", "0")

    action = OperatorAction.objects.get()
    assert action.actor == operator and action.actor_name == "oncall"


def test_a_second_retry_skips_with_the_reason_when_the_step_is_already_queued(world):
    call("retry_failed", "--reason", "first", "--step", "ops_value", "--rate", "0")
    step_run = StepRun.objects.get(input=world.value[0])

    # Not FAILED any more: the selector no longer offers it, and the service would skip it.
    assert retry_json("--reason", "second", "--step", "ops_value")["matched"] == 0
    from pipeline_ops.services.operations import step_runs_retry_plan

    assert step_runs_retry_plan(step_runs=[step_run])[0].kind == "queued"


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: --reason"),
        (["--reason", "  "], "--reason must not be empty"),
        (["--reason", "r", "--limit", "0"], "--limit must be at least 1"),
        (["--reason", "r", "--rate", "-1"], "--rate must be zero or more"),
        (["--reason", "r", "--since", "yesterday-ish"], "--since 'yesterday-ish'"),
        (["--reason", "r", "--pipeline", "nope"], "Unknown pipeline 'nope'"),
        (["--reason", "r", "--user", "ghost"], "--user 'ghost': no such user"),
    ],
)
def test_retry_failed_refuses_and_changes_nothing_when_arguments_are_bad(world, args, message):
    with pytest.raises(CommandError, match=message):
        call("retry_failed", *args)
    assert OperatorAction.objects.count() == 0
    assert StepRun.objects.filter(status=StepStatus.FAILED).count() == 3


# --- pipeline_status ----------------------------------------------------------------------------


def test_pipeline_status_json_equals_the_database_when_steps_ran_and_failed(world):
    from django.utils import timezone as tz
    from django_q.conf import Conf

    status = json.loads(call("pipeline_status", "--json"))

    assert status["inputs"] == {s: PipelineInput.objects.filter(status=s).count() for s in status["inputs"]}
    assert sum(status["inputs"].values()) == PipelineInput.objects.count() == 6
    by_step = {row["step"]: row for row in status["steps"]}
    for step, row in by_step.items():
        runs = StepRun.objects.filter(step=step)
        assert row["succeeded"] == runs.filter(status=StepStatus.SUCCEEDED).count()
        assert row["failed"] == runs.filter(status=StepStatus.FAILED).count()
        assert row["active"] == runs.filter(status__in=[StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT]).count()
    assert by_step["preprocess"]["failure_rate"] == 0.0 and by_step["ops_boom"]["failure_rate"] == 1.0
    for step, row in by_step.items():  # by attempts, counted here from the attempts table itself
        attempts = Attempt.objects.filter(record__scope="step", record__operation=f"step:{step}")
        failed = attempts.filter(status__in=[AttemptStatus.FAILED, AttemptStatus.UNKNOWN, AttemptStatus.TIMED_OUT]).count()
        assert (row["attempts"], row["attempts_failed"]) == (attempts.count(), failed)
        assert row["attempt_failure_rate"] == (round(failed / attempts.count(), 4) if attempts.count() else None)
    assert status["attempts"] == {s: Attempt.objects.filter(status=s).count() for s in AttemptStatus.values}
    assert status["unknown_outcomes"] == Attempt.objects.filter(status=AttemptStatus.UNKNOWN).count()
    assert status["fenced_late_writes"] == Attempt.objects.filter(status=AttemptStatus.FENCED).count() == 1
    processing = IdempotencyRecord.objects.filter(status=RecordStatus.PROCESSING)
    assert status["leases"]["processing"] == processing.count()
    assert status["leases"]["stuck"] == processing.filter(lease_expires_at__lt=tz.now()).count()
    ready = OrmQ.objects.filter(key=Conf.PREFIX, lock__lt=tz.now()).count()
    assert status["queue"] == {"broker": settings.PIPELINE_OPS_BROKER, "ready": ready, "in_flight": 0, "error": None}
    assert ready >= 3  # the three next steps queued by the runner
    workers = {w["worker"] for w in status["workers_seen"]}
    assert workers == set(Attempt.objects.exclude(worker="").values_list("worker", flat=True))


def test_pipeline_status_prints_a_readable_summary_when_not_json(world):
    out = call("pipeline_status")

    assert "inputs     pending" in out
    assert "ops_boom" in out and "100.0%" in out
    assert "fenced late writes (duplicates prevented) 1" in out
    assert f"queue      {settings.PIPELINE_OPS_BROKER}: ready" in out


def test_pipeline_status_refuses_when_window_is_not_positive():
    with pytest.raises(CommandError, match="--workers-window must be more than 0"):
        call("pipeline_status", "--workers-window", "0")
