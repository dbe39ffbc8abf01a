"""The two retentions seen from the pipeline (pipeline_ops/services/retention.py, the command
``retention_purge``): the console keeps its history past the key retention, the history purge
deletes old finished history and never live work, and /metrics never goes backwards."""
from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.purge import records_purge
from pipeline_ops.models import BulkAction, FailedAttempt, OperatorAction, PipelineInput, StepOutput, StepRun
from pipeline_ops.selectors.failures import step_runs_list_failed
from pipeline_ops.states import InputStatus, StepStatus

from .test_observability import scrape

pytestmark = pytest.mark.django_db

KEY_RETENTION_PASSED = timedelta(hours=25)
HISTORY_RETENTION_PASSED = timedelta(days=31)


@pytest.fixture
def client():
    return Client(HTTP_HOST="localhost")


def audit(*, created_at, batch=None) -> OperatorAction:
    row = OperatorAction.objects.create(source="cli", action="retry", reason="r", target_type="step_run", target_id="1",
                                        outcome="done", **({"batch": batch} if batch else {}))
    OperatorAction.objects.filter(pk=row.pk).update(created_at=created_at)
    return row


def test_failed_attempts_and_the_input_timeline_survive_when_the_key_retention_has_passed(admin_client, world):
    boom = world.boom[0]

    report = records_purge(now=timezone.now() + KEY_RETENTION_PASSED)

    # retry_failed --error-type, the Failed attempts page and the input's timeline still see them.
    assert {s.input_id for s in step_runs_list_failed(error_type="OpsBoomError")} == {i.pk for i in world.boom}
    assert FailedAttempt.objects.filter(error_message="the test step always fails").count() == 2
    page = admin_client.get(reverse("admin:pipeline_ops_pipelineinput_change", args=[boom.pk])).content.decode()
    timeline = page[page.index('id="input-timeline"'):]
    assert "#1" in timeline and "OpsBoomError" in timeline and "the test step always fails" in timeline
    assert report.forgotten == IdempotencyRecord.objects.forgotten().count() > 0 and report.deleted == 0
    assert IdempotencyRecord.objects.forgotten().filter(result__isnull=False).count() == 0


def test_history_purge_deletes_old_finished_history_but_never_live_work_when_past_history_retention(world):
    from pipeline_ops.services.retention import retention_purge

    now = timezone.now()
    old, recent = now - timedelta(days=40), now + HISTORY_RETENTION_PASSED - timedelta(days=2)
    running_bulk = BulkAction.objects.create(action="retry", target_type="step_run", target_ids=[1], source="cli", reason="r",
                                             status=BulkAction.Status.RUNNING)
    done_bulk = BulkAction.objects.create(action="retry", target_type="step_run", target_ids=[1], source="cli", reason="r",
                                          status=BulkAction.Status.DONE)
    BulkAction.objects.filter(pk=done_bulk.pk).update(updated_at=old)
    old_audit, recent_audit, running_audit = audit(created_at=old), audit(created_at=recent), audit(created_at=old, batch=running_bulk.batch)
    ok_records = set(StepRun.objects.filter(input__in=world.ok, position=0).values_list("idempotency_record_id", flat=True))

    report = retention_purge(now=now + HISTORY_RETENTION_PASSED)

    # The three failed inputs (dead steps, nothing live) went with their step runs; the three
    # RUNNING ones (their next step QUEUED) stayed, and so did their step records, past both
    # retentions, because their step runs still show them.
    assert (report.history.inputs, report.history.step_runs) == (3, 3)
    assert set(PipelineInput.objects.values_list("status", flat=True)) == {InputStatus.RUNNING}
    assert set(PipelineInput.objects.all()) == set(world.ok)
    assert StepRun.objects.filter(status=StepStatus.QUEUED).count() == 3 and StepOutput.objects.count() == 3
    assert set(IdempotencyRecord.objects.values_list("pk", flat=True)) == ok_records
    assert Attempt.objects.count() == 3 and not Attempt.objects.filter(record_id__isnull=True).exists()
    assert set(OperatorAction.objects.all()) == {recent_audit, running_audit}  # a running action keeps its audit
    assert set(BulkAction.objects.all()) == {running_bulk}
    assert report.history.operator_actions == 1 and report.history.bulk_actions == 1
    assert old_audit.pk not in set(OperatorAction.objects.values_list("pk", flat=True))


def test_history_purge_keeps_a_finished_input_when_its_dead_step_was_retried_within_the_history_retention(world):
    from pipeline_ops.services.retention import history_purge

    retried = StepRun.objects.get(input=world.value[0])
    StepRun.objects.filter(pk=retried.pk).update(updated_at=timezone.now() + timedelta(days=30))  # an operator moved it

    report = history_purge(now=timezone.now() + HISTORY_RETENTION_PASSED)

    assert report.inputs == 2 and PipelineInput.objects.filter(pk=world.value[0].pk).exists()


def test_metrics_never_go_backwards_when_the_key_and_then_the_history_retention_pass(client, world):
    families = ("pipeline_ops_attempts", "pipeline_ops_fenced_late_writes_total", "pipeline_ops_idempotent_replays_total",
                "pipeline_ops_inputs", "pipeline_ops_step_runs", "pipeline_ops_step_latency_seconds_count",
                "pipeline_ops_step_latency_seconds_bucket")
    before = scrape(client)

    key_report = records_purge(now=timezone.now() + KEY_RETENTION_PASSED)
    after_key = scrape(client)
    for name in families:
        assert after_key[name] == before[name], name
    assert key_report.forgotten > 0

    from pipeline_ops.services.retention import retention_purge

    report = retention_purge(now=timezone.now() + HISTORY_RETENTION_PASSED)
    after_history = scrape(client)

    assert report.history.inputs == 3 and report.log.deleted > 0
    for name in families:
        assert after_history[name] == before[name], name
    for labels, seconds in before["pipeline_ops_step_latency_seconds_sum"].items():
        assert after_history["pipeline_ops_step_latency_seconds_sum"][labels] == pytest.approx(seconds, abs=1e-5)
    # A second purge with nothing left to delete adds nothing.
    retention_purge(now=timezone.now() + HISTORY_RETENTION_PASSED)
    assert all(scrape(client)[name] == before[name] for name in families)


# --- the command ---------------------------------------------------------------------------------


def run_command(*args) -> str:
    out = io.StringIO()
    call_command("retention_purge", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def snapshot() -> tuple:
    return (
        list(PipelineInput.objects.order_by("pk").values_list("pk", "status")),
        StepRun.objects.count(), StepOutput.objects.count(), OperatorAction.objects.count(),
        list(IdempotencyRecord.objects.order_by("pk").values_list("pk", "forgotten_at", "result")),
        Attempt.objects.count(),
    )


def test_command_changes_nothing_and_counts_what_it_would_purge_when_dry_run(world):
    audit(created_at=timezone.now() - timedelta(days=40))
    before = snapshot()

    summary = json.loads(run_command("--dry-run", "--json", "--older-than", "0", "--history-older-than", "0"))

    assert snapshot() == before
    assert summary["dry_run"] is True
    # What the real run does: the three failed inputs' records and the API key's go; the three
    # RUNNING inputs' preprocess keys are forgotten and kept as their history.
    assert (summary["inputs"], summary["step_runs"], summary["operator_actions"], summary["records"]) == (3, 3, 1, 4)
    assert summary["keys_forgotten"] == 3


def test_command_purges_both_retentions_and_prints_one_summary_line_when_run_for_real(world):
    text = run_command("--older-than", "0", "--history-older-than", "0")

    assert text.splitlines() == [
        "retention_purge: deleted 3 input(s) (3 step runs, 0 outputs), 0 operator action(s), 0 background action(s), "
        "4 idempotency record(s) with their attempts; forgot 3 key(s); 0 stuck (PROCESSING, lease expired) kept."
    ]
    assert PipelineInput.objects.count() == 3 and IdempotencyRecord.objects.forgotten().count() == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--limit", "0"], "--limit must be at least 1."),
        (["--batch-size", "0"], "--batch-size must be at least 1."),
        (["--history-older-than", "-1"], "--history-older-than must be zero or more hours."),
        (["--older-than", "48", "--history-older-than", "24"], "--history-older-than must be at least --older-than"),
    ],
)
def test_command_refuses_with_one_line_when_an_argument_is_bad(world, args, message):
    before = snapshot()

    with pytest.raises(CommandError, match=message) as caught:
        run_command(*args)

    assert "\n" not in str(caught.value) and snapshot() == before


@override_settings(IDEMPOTENCY={"RETENTION_HOURS": 48, "HISTORY_RETENTION_HOURS": 24})
def test_command_refuses_with_one_line_when_the_history_retention_is_shorter_than_the_key_retention(world):
    before = snapshot()

    with pytest.raises(CommandError, match=r"HISTORY_RETENTION_HOURS \(24\) must be at least RETENTION_HOURS \(48\)") as caught:
        run_command("--history-older-than", "0")

    assert "\n" not in str(caught.value) and snapshot() == before
