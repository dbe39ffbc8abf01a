"""The incident replayed on real workers (``manage.py chaos``), on PostgreSQL: the PostgreSQL broker
(pipeline_ops.pg_broker, the default there), django-q2's ORM broker and Redis.

Each run starts real qcluster subprocesses pointed at the test database, the real fault-injecting
model server (stalls past the client timeout, 5xx, 429), enqueues random steps twice, SIGKILLs a
busy worker and a whole cluster mid-step and restarts it, and hands every late answer to its
timed-out attempt. The guarded run must end with every input terminal, no duplicate, nothing
lost, verify_integrity clean and the late writes fenced; the control group (``--naive``), on the
same faults, must really produce duplicates.

Duplicates are counted from the effects log (``pipeline_ops.chaos.effects``: one line per effect,
no unique constraint), the same counter for both runs; the output table's own count is kept under
its real name (``output_rows_beyond_one_per_step``). ``--db-faults`` adds real
``pg_terminate_backend`` calls on the workers' connections and a short ``lock_timeout``.
"""
from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pipeline_ops.chaos import naive
from pipeline_ops.models import PipelineInput, StepOutput, StepRun
from pipeline_ops.states import INPUT_TERMINAL, StepStatus

pytestmark = [
    pytest.mark.cluster, pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True),
]

SMALL = ["--inputs", "10", "--clusters", "2", "--workers", "2", "--timeout", "150", "--seed", "11"]


def _chaos(*args: str, check: bool = True) -> dict:
    """The runs of one ``chaos --json`` call by mode. ``check=False``: the command's own verdict
    (CommandError when not clean) is not raised, so the test's assertions say what went wrong."""
    out = io.StringIO()
    try:
        call_command("chaos", "--json", *SMALL, *args, stdout=out)
    except CommandError:
        if check or not out.getvalue():
            raise
    return {run["mode"]: run for run in json.loads(out.getvalue())["runs"]}


def _assert_guarded_clean(run: dict) -> None:
    assert run["timed_out"] is False
    assert run["inputs"] == 10 and run["steps"] == 30
    # The effects log: no step's effect twice, and each succeeded step's effect exactly once.
    assert run["duplicates"] == 0, run["effects"]
    assert run["effects_max"] == 1, run["effects"]
    assert run["effects_total"] == run["steps_by_status"].get("SUCCEEDED", 0), run["effects"]
    assert run["output_rows_beyond_one_per_step"] == 0
    assert run["lost"] == 0, run["lost_detail"]
    assert run["integrity"]["ok"], run["integrity"]
    call_command("verify_integrity", stdout=io.StringIO())  # the operators' command agrees (raises on a violation)
    # The database agrees with the summary: every input terminal, one output per succeeded step.
    inputs = PipelineInput.objects.filter(submission_scope=f"chaos:{run['run']}")
    assert inputs.count() == 10
    assert not inputs.exclude(status__in=INPUT_TERMINAL).exists()
    steps = StepRun.objects.filter(input__in=inputs)
    assert StepOutput.objects.filter(input__in=inputs).count() == steps.filter(status=StepStatus.SUCCEEDED).count()
    assert not steps.filter(status=StepStatus.SUCCEEDED, output__isnull=True).exists()
    # Late answers were injected and every one of them was refused by the guard.
    assert run["faults"]["stalls"] > 0
    assert run["faults"]["late_writes_delivered"] > 0
    assert run["fenced"] > 0
    assert run["late_writes_accepted"] == 0
    assert not StepOutput.objects.filter(input__in=inputs, output__late=True).exists()
    # The SIGKILLs really happened, and the steps whose workers died still finished exactly once.
    assert run["faults"]["workers_sigkilled"] == 1
    assert run["faults"]["clusters_sigkilled"] == 1 and run["faults"]["clusters_restarted"] == 1
    # The attempts that were RUNNING in the killed workers (found by Attempt.worker = host:pid)
    # did not stay RUNNING: a new attempt took each key over once its lease expired (TIMED_OUT).
    assert "RUNNING" not in run["attempts_by_status"]
    assert run["killed_attempts"], "no SIGKILLed worker was running a claimed attempt"
    assert any(a["status"] == "TIMED_OUT" for a in run["killed_attempts"]), run["killed_attempts"]
    killed_steps = [int(name.split(":", 1)[1]) for name in run["faults"]["killed_tasks"] if name.startswith("step_run:")]
    assert killed_steps
    for step in StepRun.objects.filter(pk__in=killed_steps):
        assert step.status in {StepStatus.SUCCEEDED, StepStatus.FAILED}
        assert StepOutput.objects.filter(step_run=step).count() == (1 if step.status == StepStatus.SUCCEEDED else 0)


def test_naive_duplicates_and_guarded_none_when_same_faults_on_postgres_broker():
    try:
        # A naive late answer is written by a thread of the worker that gave up on the call, so
        # it dies with that worker when the scenario SIGKILLs it (a busy worker, half the
        # workers with the cluster). At this size the default rate (0.25) stalls about 2 calls
        # and sometimes none reach a surviving worker; 0.6 stalls about 6. The guarded run
        # gets as many late answers to fence (a retry with the same key is replayed, fault-free).
        runs = _chaos("--broker", "postgres", "--naive", "--stall-rate", "0.6")
        naive_run, guarded = runs["naive"], runs["guarded"]
        # The control group is honest: the same faults really duplicate results without the guard,
        # and the incident's own way among them: a timed-out call that finished late and saved.
        # Its duplicates are the effects counter's (the same one the guarded run is measured by),
        # and its own table (no unique constraint) saw them too.
        assert naive_run["duplicates"] == naive_run["effects"]["duplicates"] > 0
        assert naive_run["effects_max"] > 1
        assert naive_run["output_rows_beyond_one_per_step"] > 0
        assert naive_run["faults"]["stalls"] > 0
        assert naive_run["late_rows"] > 0
        _assert_guarded_clean(guarded)
        assert guarded["broker"] == "postgres"
    finally:
        naive.naive_table_drop()


def test_every_input_terminal_and_late_writes_fenced_when_redis_broker_loses_killed_tasks(redis_available):
    runs = _chaos("--broker", "redis")
    _assert_guarded_clean(runs["guarded"])
    assert runs["guarded"]["broker"] == "redis"
    assert runs["guarded"]["reconciler_runs"] > 0


@pytest.mark.parametrize("broker", ["postgres", "orm", "redis"])
def test_no_step_failed_by_infrastructure_when_workers_backends_are_terminated(broker, request):
    if broker == "redis":
        request.getfixturevalue("redis_available")
    # Real pg_terminate_backend on the clusters' connections (found by their application_name)
    # about every 0.7 s, and a 100 ms lock_timeout on their sessions, next to every other fault.
    # A database blip must never make a step terminal nor store a result twice: only the
    # injected model errors may fail a step.
    runs = _chaos("--broker", broker, "--db-faults", "--db-fault-interval", "0.7", "--lock-timeout-ms", "100",
                  check=False)
    guarded = runs["guarded"]
    assert guarded["db_faults"] is True and guarded["lock_timeout_ms"] == 100
    assert guarded["faults"]["backends_terminated"] > 0, guarded["faults"]
    assert guarded["failed_by_infrastructure"] == 0, (
        guarded["failed_steps_by_last_error"], guarded["failed_by_infrastructure_steps"])
    _assert_guarded_clean(guarded)
