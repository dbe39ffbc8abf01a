"""The console in a real browser: Playwright (sync API) driving Debian's headless Chromium against
pytest-django's live server, logging in through the login form like an operator.

Screenshots go to test-artifacts/ (gitignored); docs/dashboard.png and docs/input-timeline.png
are copies of the ones this module takes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

# Playwright's sync API runs an event loop in this thread; Django's ORM calls from the test body
# would otherwise be refused as "async-unsafe" although nothing here is concurrent.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

from idempotency.models import Attempt, IdempotencyRecord  # noqa: E402
from idempotency.states import AttemptStatus, RecordStatus  # noqa: E402
from pipeline_ops.models import FailedAttempt, OperatorAction, PipelineInput, StepRun  # noqa: E402
from pipeline_ops.states import InputStatus, StepStatus  # noqa: E402
from pipeline_ops.tasks import step_run_execute_task  # noqa: E402
from tests.admin.helpers import bulk_world, failed_input, operator  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def log_in(page, live_server, user) -> None:
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", user.username)
    page.fill("#id_password", "pw-" + user.username)
    page.click("input[type=submit]")
    page.wait_for_selector("#user-tools")


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def run_worker(pipeline_input: PipelineInput) -> None:
    """Be the django-q2 worker: execute each queued step of the input until it is terminal."""
    for _ in range(10):
        pipeline_input.refresh_from_db()
        if pipeline_input.status != InputStatus.RUNNING:
            return
        queued = StepRun.objects.filter(input=pipeline_input, status=StepStatus.QUEUED).order_by("position").first()
        if queued is None:
            return
        step_run_execute_task(queued.pk)


def test_operator_without_the_retry_permission_does_not_see_the_action(page, live_server):
    failed_input()
    viewer = operator("viewer")

    log_in(page, live_server, viewer)
    page.goto(f"{live_server.url}/admin/pipeline_ops/failedattempt/")

    assert page.locator("#result_list").count() == 1
    assert page.locator("select[name=action] option[value=retry_steps]").count() == 0
    assert page.locator("select[name=action] option[value=force_retry_steps]").count() == 0
    shot(page, "failed-attempts-viewer.png")


def test_operator_filters_failed_attempts_retries_with_a_reason_and_sees_the_input_succeed(page, live_server):
    pipeline_input, step_run, attempt = failed_input()
    failed_input(error=ValueError("bad prompt template"))  # another error type, filtered out below
    alice = operator("alice", "retry_steprun")

    log_in(page, live_server, alice)
    page.goto(f"{live_server.url}/admin/pipeline_ops/failedattempt/")
    page.click("#changelist-filter a:text('ConnectionError')")
    page.wait_for_url(re.compile(r"error_type=ConnectionError"))
    assert page.locator("#result_list tbody tr").count() == 1
    page.check(f"input[name=_selected_action][value='{attempt.pk}']")
    page.select_option("select[name=action]", "retry_steps")
    page.click("button[name=index]")

    # The confirmation page: what will happen, what will not, and a required reason.
    page.wait_for_selector("#operator-action")
    assert "Will happen: 1" in page.inner_text("#will-happen")
    assert "failed after 1 attempt(s): ConnectionError" in page.inner_text("table.plan-acting")
    page.fill("#id_reason", "model provider outage is over (INC-231)")
    shot(page, "retry-confirmation.png")
    page.click("#confirm-action")

    page.wait_for_selector("ul.messagelist")
    assert page.inner_text("ul.messagelist").strip() == "1 queued"
    assert OperatorAction.objects.get().reason == "model provider outage is over (INC-231)"

    run_worker(pipeline_input)

    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/{pipeline_input.pk}/change/")
    page.wait_for_selector("#input-timeline")
    assert "Succeeded" in page.inner_text("div.field-status")
    preprocess = page.inner_text("#step-preprocess")
    assert "#1" in preprocess and "#2" in preprocess and "ConnectionError" in preprocess and "Succeeded" in preprocess
    assert page.locator("#input-timeline svg.gantt rect").count() == Attempt.objects.filter(record__scope="step", record__key__startswith=str(pipeline_input.pk)).count()
    page.click("#step-preprocess details summary")  # the traceback opens on demand
    assert "Traceback" in page.inner_text("#step-preprocess details pre") or "ConnectionError" in page.inner_text("#step-preprocess details pre")
    shot(page, "input-timeline.png")
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.SUCCEEDED


def test_dashboard_shows_the_same_numbers_as_the_database(page, live_server):
    bulk_world(inputs=300)
    for _ in range(2):
        failed_input()
    alice = operator("alice", "retry_steprun")

    log_in(page, live_server, alice)
    page.click("#ops-dashboard-link a")
    page.wait_for_selector("#ops-dashboard")

    def metric(name: str) -> int:
        return int(page.inner_text(f"[data-metric={name}]").strip())

    assert metric("duplicates_prevented") == Attempt.objects.filter(status=AttemptStatus.FENCED).count()
    assert metric("unknown_outcomes") == Attempt.objects.filter(status=AttemptStatus.UNKNOWN).count()
    assert metric("failed_attempts") == FailedAttempt.objects.count()
    stuck = IdempotencyRecord.objects.filter(status=RecordStatus.PROCESSING, lease_expires_at__lt=page_time(page)).count()
    assert metric("stuck_leases") == stuck
    for status in InputStatus.values:
        day = page.inner_text(f"#inputs-by-status tr[data-status={status}] td.day")
        assert int(day) == PipelineInput.objects.filter(status=status).count(), status
    assert page.locator("#throughput svg rect").count() > 0
    shot(page, "dashboard.png")


def page_time(page):
    """The instant the dashboard says it was computed at (its numbers are as of then)."""
    from datetime import datetime

    text = re.search(r"As of (\S+ \S+)", page.inner_text("#ops-dashboard")).group(1)
    from django.utils import timezone

    return timezone.make_aware(datetime.strptime(text, "%Y-%m-%d %H:%M:%S"), timezone.get_current_timezone()).replace(microsecond=999999)


def test_forced_retry_fences_the_stalled_attempt_and_the_timeline_shows_it(page, live_server):
    from datetime import timedelta

    from django.utils import timezone

    from idempotency import guard
    from pipeline_ops.models import StepOutput
    from tests.admin.helpers import claim_step, first_step, submit

    pipeline_input = submit()
    step_run = first_step(pipeline_input)
    stalled = claim_step(step_run, worker="gpu-7:4242", lease_seconds=600, now=timezone.now() - timedelta(seconds=8))
    senior = operator("senior", "retry_steprun", "force_retry_steprun")

    log_in(page, live_server, senior)
    page.goto(f"{live_server.url}/admin/pipeline_ops/steprun/?status__exact=RUNNING")
    page.check(f"input[name=_selected_action][value='{step_run.pk}']")
    page.select_option("select[name=action]", "force_retry_steps")
    page.click("button[name=index]")
    page.wait_for_selector("#operator-action")
    assert "running on worker gpu-7:4242 until" in page.inner_text("table.plan-acting")
    page.fill("#id_reason", "gpu-7 stalled on the provider call (INC-232)")
    page.click("#confirm-action")
    page.wait_for_selector("ul.messagelist")
    assert page.inner_text("ul.messagelist").strip() == "1 queued"

    run_worker(pipeline_input)
    # The stalled worker wakes up and tries to store its result: refused, recorded, no duplicate.
    late = guard.complete(
        attempt=stalled, result={"late": True},
        write=lambda: StepOutput.objects.create(step_run=step_run, input=pipeline_input, step=step_run.step, attempt=stalled, output={"late": True}),
    )
    assert late.fenced
    assert StepOutput.objects.filter(input=pipeline_input, step=step_run.step).count() == 1

    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/{pipeline_input.pk}/change/")
    preprocess = page.inner_text("#step-preprocess")
    assert "Fenced (late write refused)" in preprocess and "gpu-7:4242" in preprocess and "Succeeded" in preprocess
    actions = page.inner_text("#operator-actions-table")
    assert "senior" in actions and "Forced retry" in actions and "gpu-7 stalled on the provider call (INC-232)" in actions
    shot(page, "input-timeline-fenced.png")
    page.goto(f"{live_server.url}/admin/pipeline_ops/fencedattempt/")
    assert page.locator("#result_list tbody tr").count() == 1
    shot(page, "fenced-attempts.png")
