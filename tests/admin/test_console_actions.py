"""Issue 13's console pieces through the admin's front door (admin client) on real databases:
Discard, the per-row Retry safely, a confirmation with nothing to do, prefix search, the live view."""
from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from idempotency.models import IdempotencyRecord
from idempotency.states import RecordStatus
from pipeline_ops.models import DeadStepRun, OperatorAction, RetryingStepRun, StepRun
from pipeline_ops.services import discard, operations
from pipeline_ops.states import InputStatus, StepStatus

from .helpers import claim_step, failed_input, first_step, operator, submit

pytestmark = pytest.mark.django_db


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_discard_moves_a_dead_step_out_of_the_dead_page_with_an_audit_row_when_confirmed():
    pipeline_input, step_run, _ = failed_input()
    assert list(DeadStepRun.objects.values_list("pk", flat=True)) == [step_run.pk]
    client = login(operator("dora", "discard_steprun"))
    url = reverse("admin:pipeline_ops_deadsteprun_changelist")

    confirm = client.post(url, {"action": "discard_steps", "_selected_action": [step_run.pk]})
    assert confirm.status_code == 200 and "Will happen: 1" in confirm.content.decode()
    assert "never retried" in confirm.content.decode()
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.FAILED  # nothing before the reason
    done = client.post(url, {"action": "discard_steps", "_selected_action": [step_run.pk], "post": "yes", "reason": "bad input, INC-9"})

    assert done.status_code == 302
    step_run.refresh_from_db()
    pipeline_input.refresh_from_db()
    assert step_run.status == StepStatus.DISCARDED and pipeline_input.status == InputStatus.FAILED
    assert not DeadStepRun.objects.exists()
    audit = OperatorAction.objects.get()
    assert (audit.action, audit.outcome, audit.actor_name, audit.reason) == ("discard", "done", "dora", "bad input, INC-9")
    assert audit.before["step_status"] == StepStatus.FAILED and audit.after["step_status"] == StepStatus.DISCARDED
    # A discarded step is never retried, and says why.
    plan = operations.step_runs_retry_plan(step_runs=[step_run])
    assert [(d.acts, d.kind) for d in plan] == [(False, "discarded")]


def test_discard_changes_nothing_when_the_operator_lacks_the_permission():
    _, step_run, _ = failed_input()
    client = login(operator("rita", "retry_steprun"))
    page = client.get(reverse("admin:pipeline_ops_deadsteprun_changelist")).content.decode()
    assert 'value="discard_steps"' not in page and 'class="button row-discard"' not in page and 'class="button row-retry"' in page

    client.post(reverse("admin:pipeline_ops_deadsteprun_changelist"),
                {"action": "discard_steps", "_selected_action": [step_run.pk], "post": "yes", "reason": "x"})
    refused = client.post(reverse("admin:pipeline_ops_steprun_row_discard", args=[step_run.pk]), {"post": "yes", "reason": "x"})

    assert refused.status_code == 403
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.FAILED and not OperatorAction.objects.exists()


def test_discard_skips_a_step_that_is_not_dead_when_it_is_running():
    pipeline_input = submit()
    step_run = first_step(pipeline_input)
    claim_step(step_run)
    report = discard.step_runs_discard(step_runs=[step_run], actor=None, reason="r", source="cli")
    step_run.refresh_from_db()
    assert report.done == 0 and step_run.status == StepStatus.RUNNING
    assert "not dead" in report.message


def test_row_retry_button_queues_the_step_through_the_confirmation_and_returns_to_its_list():
    _, step_run, _ = failed_input()
    client = login(operator("rob", "retry_steprun"))
    dead = reverse("admin:pipeline_ops_deadsteprun_changelist")
    page = client.get(dead).content.decode()
    row_url = reverse("admin:pipeline_ops_steprun_row_retry", args=[step_run.pk])
    assert f'href="{row_url}?next=' in page

    confirm = client.get(row_url, {"next": dead})
    assert confirm.status_code == 200
    text = confirm.content.decode()
    assert "Will happen: 1" in text and "queued again" in text  # what it WILL do, beside what it is now
    done = client.post(f"{row_url}?next={dead}", {"post": "yes", "reason": "provider back"})

    assert done.status_code == 302 and done["Location"] == dead
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.QUEUED
    assert OperatorAction.objects.get().outcome == "done"


def test_confirm_with_nothing_to_do_writes_nothing_and_the_button_is_disabled():
    pipeline_input, step_run, _ = failed_input()
    StepRun.objects.filter(pk=step_run.pk).update(status=StepStatus.CANCELLED)
    client = login(operator("carl", "retry_steprun"))
    url = reverse("admin:pipeline_ops_steprun_changelist")

    page = client.post(url, {"action": "retry_steps", "_selected_action": [step_run.pk]}).content.decode()
    assert 'value="Retry (0)" disabled' in page
    client.post(url, {"action": "retry_steps", "_selected_action": [step_run.pk], "post": "yes", "reason": "crafted"})

    assert not OperatorAction.objects.exists()


def test_spread_message_says_tenths_of_a_second_when_two_steps_are_spread():
    steps = [failed_input()[1] for _ in range(2)]
    report = operations.step_runs_retry(step_runs=steps, actor=None, reason="r", source="cli", rate_per_second=5)
    assert report.message == "2 queued (spread over 0.2 s)"


def test_inputs_search_finds_an_input_by_the_short_id_the_list_shows():
    pipeline_input, step_run, _ = failed_input()
    other = submit()
    client = login(operator("viewer"))
    page = client.get(reverse("admin:pipeline_ops_pipelineinput_changelist"), {"q": str(pipeline_input.pk)[:8]}).content.decode()
    assert "1 pipeline input" in page and str(other.pk)[:8] not in page
    # the failed step and its error are on the row
    assert "preprocess" in page and "ConnectionError" in page
    key_page = client.get(reverse("admin:pipeline_ops_pipelineinput_changelist"), {"q": pipeline_input.idempotency_key[:10]}).content.decode()
    assert "1 pipeline input" in key_page
    attempts = client.get(reverse("admin:pipeline_ops_failedattempt_changelist"), {"q": str(pipeline_input.pk)[:8]}).content.decode()
    assert "1 failed attempt" in attempts and "Failed" in attempts  # the step's state now


def test_failed_attempt_row_shows_the_steps_state_now_when_the_step_has_since_been_retried():
    _, step_run, _ = failed_input()
    operations.step_runs_retry(step_runs=[step_run], actor=None, reason="r", source="cli")
    page = login(operator("viewer")).get(reverse("admin:pipeline_ops_failedattempt_changelist")).content.decode()
    assert 'class="status status-queued">Queued<' in page


def test_live_view_reports_the_databases_numbers_and_a_new_version_when_an_input_changes():
    pipeline_input, step_run, _ = failed_input()
    client = login(operator("viewer"))
    live = reverse("admin:pipeline_ops_live")

    dash = client.get(live, {"view": "dashboard"}).json()
    assert dash["metrics"]["dead"] == DeadStepRun.objects.count() == 1
    assert dash["metrics"]["retries"] == RetryingStepRun.objects.count()
    before = client.get(live, {"view": "input", "id": str(pipeline_input.pk)}).json()
    dead_before = client.get(live, {"view": "list", "model": "deadsteprun"}).json()
    operations.step_runs_retry(step_runs=[step_run], actor=None, reason="r", source="cli")
    after = client.get(live, {"view": "input", "id": str(pipeline_input.pk)}).json()
    dead_after = client.get(live, {"view": "list", "model": "deadsteprun"}).json()

    assert before["metrics"]["step_preprocess"] == "Failed" and after["metrics"]["step_preprocess"] == "Queued"
    assert before["version"] != after["version"] and dead_before["version"] != dead_after["version"]
    assert dead_after["metrics"]["count"] == 0
    assert Client().get(live, {"view": "dashboard"}).status_code == 302  # staff only (admin login)
    assert IdempotencyRecord.objects.get().status != RecordStatus.PROCESSING


def test_chart_labels_reach_the_last_bar_when_the_series_has_24_hours():
    from pipeline_ops.admin.dashboard import throughput_chart
    from pipeline_ops.selectors import attempts_series

    points = attempts_series(hours=24)
    chart = throughput_chart(points)
    slot = (chart["width"] - chart["left"] - 10) / len(points)
    assert chart["labels"][-1]["x"] == round(chart["left"] + (len(points) - 1) * slot + 1 + slot / 2, 1)


def test_payload_is_shown_as_json_not_python_repr_when_listed():
    submit(text="quote \" and ünïcode, None stays null")
    page = login(operator("viewer")).get(reverse("admin:pipeline_ops_pipelineinput_changelist")).content.decode()
    assert "{&quot;text&quot;: &quot;quote \\&quot; and ünïcode" in page and "{&#x27;text&#x27;" not in page
