"""The console's admin pages and actions through the front door (the Django test client), on
SQLite and PostgreSQL: bounded queries with thousands of rows, permissions, confirmation, CSRF."""
from __future__ import annotations

import re
import uuid

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.models import FailedAttempt, OperatorAction, PipelineInput, StepRun
from pipeline_ops.selectors import dashboard_get
from pipeline_ops.services import operations
from pipeline_ops.states import InputStatus, StepStatus

from .helpers import bulk_world, claim_step, failed_input, first_step, operator, submit

pytestmark = pytest.mark.django_db

# Enough for session, user, permissions, the page's count and rows, and filters; independent of
# the number of rows (an N+1 would blow far past it with 50 rows a page).
MAX_QUERIES = 18


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def changelist(model: str) -> str:
    return reverse(f"admin:{model}_changelist")


def test_console_pages_render_and_filter_in_bounded_queries_when_thousands_of_rows_exist(django_assert_max_num_queries):
    sizes = bulk_world(inputs=2000)
    assert sizes["steps"] == 6000 and sizes["attempts"] > 1500
    client = login(operator("viewer"))
    some_input = PipelineInput.objects.filter(status=InputStatus.FAILED).first()
    some_record = IdempotencyRecord.objects.filter(status=RecordStatus.PROCESSING).first()
    _, retried_step, _ = failed_input()
    operations.step_runs_retry(step_runs=[retried_step], actor=None, reason="a " + "long reason " * 40, source="cli")
    action = OperatorAction.objects.get()
    urls = {
        reverse("admin:index"): "Operations dashboard",
        changelist("pipeline_ops_pipelineinput"): "bulk",
        changelist("pipeline_ops_pipelineinput") + "?status__exact=FAILED&pipeline=default&created_within=24h": "Failed",
        changelist("pipeline_ops_pipelineinput") + f"?q={some_input.pk}": str(some_input.pk)[:8],
        changelist("pipeline_ops_pipelineinput") + "?q=bulk-7&o=7": "bulk",
        reverse("admin:pipeline_ops_pipelineinput_change", args=[some_input.pk]): "Step timeline",
        changelist("pipeline_ops_steprun") + "?status__exact=FAILED&step=preprocess": "ConnectionError",
        changelist("pipeline_ops_steprun") + f"?q={some_input.pk}": "preprocess",
        changelist("pipeline_ops_failedattempt"): "ConnectionError",
        changelist("pipeline_ops_failedattempt") + "?error_type=ConnectionError&started_within=24h": "ConnectionError",
        changelist("pipeline_ops_unknownoutcomeattempt"): "host-late",
        changelist("pipeline_ops_fencedattempt"): "host-late",
        changelist("pipeline_ops_stuckattempt"): "host-",
        changelist("idempotency_idempotencyrecord") + "?status__exact=PROCESSING&lease=expired": "expired",
        changelist("idempotency_idempotencyrecord") + f"?q={some_record.key}": some_record.key[:20],
        reverse("admin:idempotency_idempotencyrecord_change", args=[some_record.pk]): some_record.fingerprint,
        changelist("idempotency_attempt") + "?status__exact=FAILED": "ConnectionError",
        changelist("pipeline_ops_operatoraction"): "long reason",
        reverse("admin:pipeline_ops_operatoraction_change", args=[action.pk]): "QUEUED",
        reverse("admin:pipeline_ops_steprun_change", args=[retried_step.pk]): retried_step.step,
        changelist("pipeline_ops_stepoutput"): "step output",
        reverse("admin:pipeline_ops_dashboard"): "Duplicates prevented",
        changelist("pipeline_ops_retryingsteprun"): "steps waiting to retry",
        changelist("pipeline_ops_retryingsteprun") + "?step=preprocess&pipeline=default": "steps waiting to retry",
        changelist("pipeline_ops_deadsteprun"): "ConnectionError",
        changelist("pipeline_ops_deadsteprun") + f"?q={str(some_input.pk)[:8]}": str(some_input.pk)[:8],
        changelist("pipeline_ops_pipelineinput") + f"?q={str(some_input.pk)[:8]}": str(some_input.pk)[:8],
        changelist("pipeline_ops_failedattempt") + f"?q={str(some_input.pk)[:8]}": str(some_input.pk)[:8],
        reverse("admin:pipeline_ops_live") + "?view=dashboard": "duplicates_prevented",
        reverse("admin:pipeline_ops_live") + f"?view=input&id={some_input.pk}": "attempt_count",
        reverse("admin:pipeline_ops_live") + "?view=list&model=deadsteprun": "version",
    }
    # The dashboard and its live view are aggregates (no rows): a few more, still independent of the table's size.
    limits = {reverse("admin:pipeline_ops_dashboard"): 22, reverse("admin:pipeline_ops_live") + "?view=dashboard": 22}
    for url, marker in urls.items():
        with django_assert_max_num_queries(limits.get(url, MAX_QUERIES)):
            response = client.get(url)
        assert response.status_code == 200, url
        assert marker in response.content.decode(), (url, marker)

    # Filters filter, and long payloads and errors are cut in lists.
    failed_page = client.get(changelist("pipeline_ops_pipelineinput") + "?status__exact=FAILED").content.decode()
    assert "Succeeded</td>" not in failed_page and "Failed</td>" in failed_page
    assert "x" * 300 not in failed_page
    assert "long reason " * 40 not in client.get(changelist("pipeline_ops_operatoraction")).content.decode()
    assert "y" * 400 not in client.get(changelist("pipeline_ops_steprun") + "?status__exact=FAILED").content.decode()
    assert "Show counts" not in failed_page  # facets would COUNT every filter choice over the table
    stuck_rows = client.get(changelist("pipeline_ops_stuckattempt")).content.decode().count('class="field-attempt"')
    assert stuck_rows == min(50, IdempotencyRecord.objects.stuck(now=timezone.now()).count())


def test_input_page_shows_every_attempt_with_error_and_traceback_when_the_step_was_retried():
    alice = operator("alice", "retry_steprun")
    pipeline_input, step_run, attempt = failed_input()
    operations.step_runs_retry(step_runs=[step_run], actor=alice, reason="again", source="admin")
    second = claim_step(step_run, worker="worker-b:202")

    page = login(alice).get(reverse("admin:pipeline_ops_pipelineinput_change", args=[pipeline_input.pk])).content.decode()

    timeline = page[page.index('id="input-timeline"'):]
    assert "#1" in timeline and "#2" in timeline
    assert "worker-a:101" in timeline and "worker-b:202" in timeline
    assert "ConnectionError" in timeline and "model provider returned 503 (outage)" in timeline
    assert "<details><summary>traceback</summary>" in timeline
    assert "latency (ms)</span> 1234" in timeline
    assert second.number == 2


def test_retry_actions_are_hidden_and_refused_when_the_operator_lacks_the_permission():
    viewer = operator("viewer")
    _, step_run, _ = failed_input()
    client = login(viewer)

    page = client.get(changelist("pipeline_ops_steprun")).content.decode()
    assert 'value="retry_steps"' not in page and 'value="force_retry_steps"' not in page
    assert 'value="cancel_inputs"' not in client.get(changelist("pipeline_ops_pipelineinput")).content.decode()

    response = client.post(
        changelist("pipeline_ops_steprun"),
        {"action": "retry_steps", "_selected_action": [step_run.pk], "post": "yes", "reason": "sneaky"},
    )
    assert response.status_code in (200, 302)
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.FAILED
    assert not OperatorAction.objects.exists()


def test_forced_retry_is_hidden_when_the_operator_may_only_retry():
    client = login(operator("bob", "retry_steprun"))
    page = client.get(changelist("pipeline_ops_steprun")).content.decode()
    assert 'value="retry_steps"' in page
    assert 'value="force_retry_steps"' not in page and 'value="release_leases"' not in page


def test_forced_retry_is_refused_and_the_live_attempt_kept_when_the_operator_may_only_retry():
    client = login(operator("bob", "retry_steprun"))
    step_run = first_step(submit())
    live = claim_step(step_run, worker="gpu-7:4242", lease_seconds=300)

    # A hand-made POST of the hidden action, confirmation included: Django refuses the action.
    client.post(
        changelist("pipeline_ops_steprun"),
        {"action": "force_retry_steps", "_selected_action": [step_run.pk], "post": "yes", "reason": "sneaky"},
    )

    live.refresh_from_db()
    assert live.status == AttemptStatus.RUNNING
    assert IdempotencyRecord.objects.get(pk=live.record_id).status == RecordStatus.PROCESSING
    assert Attempt.objects.filter(record_id=live.record_id).count() == 1
    assert not OperatorAction.objects.exists()


def test_retry_action_confirms_requires_a_reason_then_logs_and_reports_when_permitted():
    alice = operator("alice", "retry_steprun")
    _, failed_step, _ = failed_input()
    done_input, done_step, _ = failed_input()
    operations.step_runs_retry(step_runs=[done_step], actor=alice, reason="setup", source="admin")
    from pipeline_ops.tasks import step_run_execute_task

    step_run_execute_task(done_step.pk)
    OperatorAction.objects.all().delete()
    client = login(alice)
    selected = {"action": "retry_steps", "_selected_action": [failed_step.pk, done_step.pk]}

    confirm = client.post(changelist("pipeline_ops_steprun"), selected)
    page = confirm.content.decode()
    assert confirm.status_code == 200
    assert "Will happen: 1" in page and "Will not happen (skipped): 1" in page
    assert "already completed by attempt #2" in page and "failed after 1 attempt(s)" in page
    assert 'name="csrfmiddlewaretoken"' in page

    blank = client.post(changelist("pipeline_ops_steprun"), {**selected, "post": "yes", "reason": ""})
    assert blank.status_code == 200 and "This field is required." in blank.content.decode()
    assert not OperatorAction.objects.exists()

    done = client.post(changelist("pipeline_ops_steprun"), {**selected, "post": "yes", "reason": "provider back"}, follow=True)
    messages = [str(m) for m in done.context["messages"]]
    assert messages == ["1 queued, 1 skipped: already completed by attempt #2"]
    failed_step.refresh_from_db()
    assert failed_step.status == StepStatus.QUEUED
    assert OperatorAction.objects.count() == 2
    entry = LogEntry.objects.get()
    assert entry.object_id == str(failed_step.pk) and "provider back" in entry.get_change_message()


def test_retry_from_the_failed_attempts_page_retries_their_steps_when_permitted():
    alice = operator("alice", "retry_steprun")
    _, step_run, attempt = failed_input()
    client = login(alice)

    response = client.post(
        changelist("pipeline_ops_failedattempt"),
        {"action": "retry_steps", "_selected_action": [attempt.pk], "post": "yes", "reason": "from the failed page"},
        follow=True,
    )

    assert [str(m) for m in response.context["messages"]] == ["1 queued"]
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.QUEUED
    assert OperatorAction.objects.get().target_id == str(step_run.pk)


def test_select_all_across_pages_acts_on_the_filtered_rows_when_confirmed():
    alice = operator("alice", "retry_steprun")
    failed = [failed_input()[1] for _ in range(3)]
    client = login(alice)
    url = changelist("pipeline_ops_steprun") + "?status__exact=FAILED"

    confirm = client.post(url, {"action": "retry_steps", "select_across": "1", "index": "0", "_selected_action": [failed[0].pk]})
    assert "Will happen: 3" in confirm.content.decode()
    done = client.post(url, {"action": "retry_steps", "select_across": "1", "index": "0", "_selected_action": [failed[0].pk],
                             "post": "yes", "reason": "all of them"}, follow=True)

    assert [str(m) for m in done.context["messages"]][0].startswith("3 queued")
    assert StepRun.objects.filter(pk__in=[s.pk for s in failed], status=StepStatus.FAILED).count() == 0


def test_cancel_and_release_actions_work_when_permitted():
    carol = operator("carol", "cancel_pipelineinput", "release_lease_steprun")
    running = submit()
    stuck = submit()
    from .helpers import make_stuck

    dead = make_stuck(first_step(stuck))
    client = login(carol)

    cancelled = client.post(changelist("pipeline_ops_pipelineinput"),
                            {"action": "cancel_inputs", "_selected_action": [running.pk], "post": "yes", "reason": "withdrawn"}, follow=True)
    released = client.post(changelist("pipeline_ops_stuckattempt"),
                           {"action": "release_leases", "_selected_action": [dead.pk], "post": "yes", "reason": "host gone"}, follow=True)

    assert [str(m) for m in cancelled.context["messages"]] == ["1 cancelled"]
    assert [str(m) for m in released.context["messages"]] == ["1 released"]
    running.refresh_from_db()
    dead.refresh_from_db()
    assert running.status == InputStatus.CANCELLED and dead.status == AttemptStatus.TIMED_OUT
    assert sorted(OperatorAction.objects.values_list("action", flat=True)) == ["cancel", "release_lease"]


def test_actions_are_refused_when_the_csrf_token_is_missing():
    alice = operator("alice", "retry_steprun")
    _, step_run, _ = failed_input()
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    response = client.post(changelist("pipeline_ops_steprun"),
                           {"action": "retry_steps", "_selected_action": [step_run.pk], "post": "yes", "reason": "x"})

    assert response.status_code == 403
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.FAILED


def test_console_is_closed_when_the_user_is_not_staff():
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user(username="mallory", password="pw")
    client = login(user)
    for url in (reverse("admin:pipeline_ops_dashboard"), changelist("pipeline_ops_steprun")):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]


def test_dashboard_shows_the_same_numbers_as_the_database_when_rows_exist():
    bulk_world(inputs=200)
    alice = operator("alice", "retry_steprun")
    _, step_run, _ = failed_input()

    page = login(alice).get(reverse("admin:pipeline_ops_dashboard")).content.decode()

    def metric(name: str) -> str:
        return re.search(rf'data-metric="{name}"[^>]*>([^<]*)<', page).group(1).strip()

    now = timezone.now()
    assert int(metric("duplicates_prevented")) == Attempt.objects.filter(status=AttemptStatus.FENCED).count()
    assert int(metric("unknown_outcomes")) == Attempt.objects.filter(status=AttemptStatus.UNKNOWN).count()
    assert int(metric("stuck_leases")) == IdempotencyRecord.objects.filter(status=RecordStatus.PROCESSING, lease_expires_at__lt=now).count()
    assert int(metric("failed_attempts")) == FailedAttempt.objects.count()
    assert int(metric("retries")) == StepRun.objects.filter(status=StepStatus.RETRY_WAIT).count()
    assert int(metric("dead")) == StepRun.objects.filter(status=StepStatus.FAILED).count()
    for status in InputStatus.values:
        row = re.search(rf'<tr data-status="{status}">.*?<td class="day"[^>]*>(\d+)</td>', page).group(1)
        assert int(row) == PipelineInput.objects.filter(status=status).count(), status
    failed_row = re.search(r'<tr data-step="preprocess">.*?<td class="failed"><a [^>]*>(\d+)</a></td>', page).group(1)
    assert int(failed_row) == StepRun.objects.filter(step="preprocess", status=StepStatus.FAILED).count()
    # The failure rate counts attempts: failed (FAILED, UNKNOWN, TIMED_OUT) of all attempts at the step.
    attempts = Attempt.objects.filter(record__scope="step", record__operation="step:preprocess")
    bad = attempts.filter(status__in=[AttemptStatus.FAILED, AttemptStatus.UNKNOWN, AttemptStatus.TIMED_OUT]).count()
    shown = re.search(r'<tr data-step="preprocess">.*?<td class="attempts-failed"[^>]*>(\d+) of (\d+)</td>', page).groups()
    assert (int(shown[0]), int(shown[1])) == (bad, attempts.count()) and bad > 0
    assert f"{bad / attempts.count() * 100:.1f} %" in page
    assert dashboard_get().duplicates_prevented == int(metric("duplicates_prevented"))


def test_list_count_is_capped_and_says_so_when_the_table_is_larger_than_the_cap(monkeypatch):
    from idempotency.admin import CappedCountPaginator

    monkeypatch.setattr(CappedCountPaginator, "COUNT_CAP", 5)
    for _ in range(7):
        submit()
    page = login(operator("viewer")).get(changelist("pipeline_ops_pipelineinput")).content.decode()
    assert "more than 5 pipeline inputs" in page
    assert page.count('class="field-short_id"') == 7  # the rows themselves are all there


def test_input_search_finds_nothing_and_does_not_fail_when_the_term_is_not_an_id():
    client = login(operator("viewer"))
    response = client.get(changelist("pipeline_ops_pipelineinput") + f"?q={uuid.uuid4()}")
    assert response.status_code == 200 and "0 pipeline inputs" in response.content.decode()


def test_timeline_buttons_lead_to_the_confirmation_page_when_permitted():
    alice = operator("alice", "retry_steprun", "cancel_pipelineinput")
    pipeline_input, step_run, _ = failed_input()
    client = login(alice)
    page = client.get(reverse("admin:pipeline_ops_pipelineinput_change", args=[pipeline_input.pk])).content.decode()
    assert 'id="timeline-retry"' in page and 'id="timeline-cancel"' in page

    # What the button posts: the input as the selection, the action's name, no "index".
    confirm = client.post(changelist("pipeline_ops_pipelineinput"), {"action": "retry_inputs", "_selected_action": [pipeline_input.pk]})

    assert confirm.status_code == 200
    assert "Will happen: 1" in confirm.content.decode()
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.FAILED  # nothing happens before the reason is given
    assert 'id="timeline-retry"' not in login(operator("viewer")).get(
        reverse("admin:pipeline_ops_pipelineinput_change", args=[pipeline_input.pk])).content.decode()


def test_queue_depth_counts_the_orm_queue_rows_when_steps_are_enqueued():
    from django_q.models import OrmQ

    from pipeline_ops.selectors import queue_depth

    before = queue_depth()
    for _ in range(3):
        submit()  # each submission enqueues its first step (the ORM broker: a row in this transaction)

    after = queue_depth()
    from django.conf import settings
    from django.db import connection

    # The configured default: django-q2's ORM broker on SQLite, pipeline-ops' own on PostgreSQL.
    assert after.broker == settings.PIPELINE_OPS_BROKER == ("postgres" if connection.vendor == "postgresql" else "orm")
    assert not after.error
    assert after.ready == before.ready + 3 == OrmQ.objects.count()
