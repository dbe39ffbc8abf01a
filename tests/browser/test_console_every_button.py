"""Every button and link of the console, clicked in Debian's Chromium (Playwright) against the
live server, each outcome checked in the database, not only on the page.

Each action from each page it appears on (inputs list, input page, step runs, failed / unknown /
stuck attempts, Retries, Dead), the per-row "Retry safely…" and "Discard…", bulk selections, the
disabled "Retry (0)", the confirmation's "No, take me back", the dashboard's links and its live
numbers. With ``SCREENSHOTS=1`` the test saves docs/dashboard.png, docs/retries.png,
docs/dead.png and docs/input-timeline.png (otherwise nothing is written to the tree).
"""
from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path

import pytest

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

from django.utils import timezone  # noqa: E402

from idempotency import guard  # noqa: E402
from idempotency.models import Attempt  # noqa: E402
from idempotency.policy import RetryPolicy  # noqa: E402
from idempotency.states import AttemptStatus, RecordStatus  # noqa: E402
from pipeline_ops.chaos.cluster import STALL_SECONDS, wait_progressing  # noqa: E402
from pipeline_ops.models import DeadStepRun, OperatorAction, PipelineInput, RetryingStepRun, StepRun  # noqa: E402
from pipeline_ops.states import InputStatus, StepStatus  # noqa: E402
from tests.admin.helpers import claim_step, failed_input, first_step, make_stuck, operator, submit  # noqa: E402

from .test_console_browser import browser, log_in, page, run_worker  # noqa: E402,F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS = Path(__file__).resolve().parents[2] / "docs"
ALL = ("retry_steprun", "force_retry_steprun", "release_lease_steprun", "cancel_pipelineinput", "discard_steprun")


def live_polls(page) -> int:
    return int(page.get_attribute("#ops-live", "data-polls") or "0")


def wait_for_a_poll_after_now(page) -> None:
    """Return once the live view finished a poll that began after this call: the one in flight
    may have read the database before the change, the next cannot. Follows the polls (every 5 s)
    instead of a fixed wait that a loaded machine could outlast; fails when they stop coming."""
    before = live_polls(page)
    wait_progressing(done=lambda: live_polls(page) >= before + 2, progress=lambda: live_polls(page),
                     stall_seconds=STALL_SECONDS, what="live view poll")


def docs_shot(page, name: str) -> None:
    """Only when asked (SCREENSHOTS=1): CI runs must not dirty the tree."""
    if os.environ.get("SCREENSHOTS") == "1":
        size = page.viewport_size
        page.set_viewport_size({"width": 1700, "height": 900})  # lists with their filters need the width
        page.screenshot(path=str(DOCS / name), full_page=True)
        page.set_viewport_size(size)


def waiting_input() -> tuple[PipelineInput, StepRun]:
    """A step whose attempt failed with a transient error: RETRY_WAIT, due in a minute."""
    pipeline_input = submit()
    step_run = first_step(pipeline_input)
    attempt = claim_step(step_run, worker="worker-b:202")
    try:
        raise ConnectionError("model provider returned 503")
    except ConnectionError as exc:
        guard.fail(attempt=attempt, error=exc, policy=RetryPolicy(max_attempts=5, backoff_base_seconds=60, jitter=False,
                                                                    is_transient=lambda e: True))
    StepRun.objects.filter(pk=step_run.pk).update(status=StepStatus.RETRY_WAIT, next_attempt_at=timezone.now() + timedelta(minutes=1),
                                                  last_error="ConnectionError: model provider returned 503")
    step_run.refresh_from_db()
    return pipeline_input, step_run


def unknown_input() -> tuple[PipelineInput, StepRun, Attempt]:
    """The model call timed out: the attempt is UNKNOWN (it may have happened), the step failed."""
    pipeline_input = submit()
    step_run = first_step(pipeline_input)
    attempt = claim_step(step_run, worker="worker-c:303")
    try:
        raise TimeoutError("read timed out after 30 s")
    except TimeoutError as exc:
        guard.fail(attempt=attempt, error=exc, outcome_unknown=True)
    StepRun.objects.filter(pk=step_run.pk).update(status=StepStatus.FAILED, last_error="TimeoutError: read timed out")
    PipelineInput.objects.filter(pk=pipeline_input.pk).update(status=InputStatus.FAILED)
    attempt.refresh_from_db()
    return pipeline_input, step_run, attempt


def stuck_input() -> tuple[PipelineInput, StepRun, Attempt]:
    pipeline_input = submit()
    step_run = first_step(pipeline_input)
    attempt = make_stuck(step_run)
    return pipeline_input, step_run, attempt


def confirm(page, reason: str, *, expect_message: str | None = None) -> str:
    """On the confirmation page: give the reason, confirm, return the one counted message."""
    page.wait_for_selector("#operator-action")
    page.fill("#id_reason", reason)
    page.click("#confirm-action")
    page.wait_for_selector("ul.messagelist")
    message = page.inner_text("ul.messagelist").strip()
    if expect_message is not None:
        assert message == expect_message
    return message


def bulk(page, values, action: str) -> None:
    for value in values:
        page.check(f"input[name=_selected_action][value='{value}']")
    page.select_option("select[name=action]", action)
    page.click("button[name=index]")


def audit(action: str, target) -> OperatorAction:
    return OperatorAction.objects.get(action=action, target_id=str(target.pk), outcome="done")


def status_of(obj) -> str:
    obj.refresh_from_db()
    return obj.status


# --- the input page ------------------------------------------------------------------------------


def test_input_page_buttons_retry_force_and_cancel_and_the_timeline_shows_outputs(page, live_server):
    senior = operator("senior", *ALL)
    log_in(page, live_server, senior)

    # "Retry safely…" (issue 13: it answered a bare 403, its form nested in the change form).
    first, step, _ = failed_input()
    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/{first.pk}/change/")
    page.click("#timeline-retry")
    assert "Will happen: 1" in page.inner_text("#will-happen")
    assert "queued again" in page.inner_text("table.plan-acting td.plan-will")
    confirm(page, "provider back (INC-1)", expect_message="1 queued")
    assert status_of(step) == StepStatus.QUEUED and audit("retry", step).reason == "provider back (INC-1)"

    # The worker runs it: the page shows both attempts and the stored outputs.
    run_worker(first)
    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/{first.pk}/change/")
    assert status_of(first) == InputStatus.SUCCEEDED
    for name in ("preprocess", "sentiment", "summarise"):
        assert page.locator(f"#output-{name} pre.output-json").count() == 1
    assert '"language"' in page.inner_text("#output-preprocess") or "{" in page.inner_text("#output-preprocess")
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC", page.inner_text("#step-preprocess table.attempts"))
    assert page.locator("div.field-payload_json pre").inner_text().strip().startswith("{")
    docs_shot(page, "input-timeline.png")

    # "Forced retry…" on a running step: its live attempt is fenced.
    running = submit()
    running_step = first_step(running)
    claim_step(running_step, worker="gpu-1:11", lease_seconds=600)
    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/{running.pk}/change/")
    page.click("#timeline-force-retry")
    assert "running on worker gpu-1:11" in page.inner_text("table.plan-acting")
    confirm(page, "gpu-1 stalled", expect_message="1 queued")
    assert status_of(running_step) == StepStatus.QUEUED and audit("force_retry", running_step)

    # "Cancel…".
    pending = submit()
    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/{pending.pk}/change/")
    page.click("#timeline-cancel")
    confirm(page, "customer withdrew", expect_message="1 cancelled")
    assert status_of(pending) == InputStatus.CANCELLED and audit("cancel", pending)


def test_input_page_live_notice_appears_when_a_worker_moves_its_step(page, live_server):
    pipeline_input, step, _ = failed_input()
    log_in(page, live_server, operator("viewer"))
    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/{pipeline_input.pk}/change/")
    page.wait_for_function("document.getElementById('ops-live').getAttribute('data-polls') >= '1'")
    assert page.locator("#ops-live-notice").is_hidden()

    from pipeline_ops.services import operations

    operations.step_runs_retry(step_runs=[step], actor=None, reason="from the CLI", source="cli")

    wait_for_a_poll_after_now(page)
    assert page.locator("#ops-live-notice").is_visible()
    assert page.inner_text("[data-live=step_preprocess]") == "Queued"
    page.click("#ops-live-reload")
    page.wait_for_selector("#input-timeline")
    assert "Queued" in page.inner_text("#step-preprocess h3")


# --- the inputs list -----------------------------------------------------------------------------------


def test_inputs_list_search_by_short_id_and_every_action(page, live_server):
    log_in(page, live_server, operator("senior", *ALL))
    a, a_step, _ = failed_input()
    b, b_step, _ = failed_input()
    running = submit()
    running_step = first_step(running)
    claim_step(running_step, worker="gpu-2:22", lease_seconds=600)
    doomed = submit()

    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/")
    page.fill("#searchbar", str(a.pk)[:8])
    page.press("#searchbar", "Enter")
    page.wait_for_url(re.compile(r"q="))
    assert page.locator("#result_list tbody tr").count() == 1
    assert "ConnectionError" in page.inner_text("#result_list td.field-failed_step")

    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/?status__exact=FAILED")
    bulk(page, [a.pk, b.pk], "retry_inputs")
    confirm(page, "bulk after outage")
    assert status_of(a_step) in (StepStatus.QUEUED, StepStatus.RETRY_WAIT) and status_of(b_step) in (StepStatus.QUEUED, StepStatus.RETRY_WAIT)
    assert OperatorAction.objects.filter(action="retry", outcome="done").count() == 2

    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/")
    bulk(page, [running.pk], "force_retry_inputs")
    confirm(page, "fence it", expect_message="1 queued")
    assert status_of(running_step) == StepStatus.QUEUED

    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/")
    bulk(page, [doomed.pk], "cancel_inputs")
    confirm(page, "withdrawn", expect_message="1 cancelled")
    assert status_of(doomed) == InputStatus.CANCELLED


def test_select_all_across_pages_retries_every_failed_input(page, live_server):
    inputs = [failed_input()[0] for _ in range(3)]
    log_in(page, live_server, operator("senior", *ALL))
    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/?status__exact=FAILED")
    page.check("#action-toggle")
    page.select_option("select[name=action]", "retry_inputs")
    page.click("button[name=index]")
    assert "Will happen: 3" in page.inner_text("#will-happen")
    confirm(page, "all of them")
    assert all(status_of(first_step(i)) in (StepStatus.QUEUED, StepStatus.RETRY_WAIT) for i in inputs)


def test_retry_of_more_than_the_threshold_runs_in_the_background_and_its_page_follows_it(page, live_server, settings):
    from tests.admin.test_bulk_actions import run_bulk_tasks

    settings.PIPELINE_OPS_BULK_THRESHOLD = 3
    settings.PIPELINE_OPS_BULK_SLICE = 2
    settings.PIPELINE_OPS_RETRY_RATE = 0
    inputs = [failed_input()[0] for _ in range(4)]
    log_in(page, live_server, operator("senior", *ALL))
    page.goto(f"{live_server.url}/admin/pipeline_ops/pipelineinput/?status__exact=FAILED")
    page.check("#action-toggle")
    page.select_option("select[name=action]", "retry_inputs")
    page.click("button[name=index]")
    page.wait_for_selector("#background-note")
    assert "4 selected: this runs in the background" in page.inner_text("#background-note")
    assert page.get_attribute("#confirm-action", "value") == "Retry (4, in the background)"
    message = confirm(page, "provider back, INC-40")

    assert "in the background" in message and "0 of 4" in page.inner_text("#content")
    assert all(status_of(first_step(i)) == StepStatus.FAILED for i in inputs)  # the request acted on nothing
    run_bulk_tasks()  # the workers' part: three slices
    # The page reloads itself while the action runs; it shows the end without a click.
    page.wait_for_function("document.querySelector('#content').innerText.includes('4 done, 0 skipped (4 inputs selected)')",
                           timeout=30_000)
    assert "4 of 4" in page.inner_text("#content")
    assert all(status_of(first_step(i)) == StepStatus.QUEUED for i in inputs)
    page.click("#bulk-audit-rows")
    page.wait_for_selector("#result_list")
    assert page.locator("#result_list tbody tr").count() == 4
    assert OperatorAction.objects.filter(outcome="done", reason="provider back, INC-40").count() == 4


# --- step runs and the attempt pages ---------------------------------------------------------------------


def test_step_runs_page_bulk_actions_and_row_button(page, live_server):
    log_in(page, live_server, operator("senior", *ALL))
    _, failed_step, _ = failed_input()
    _, running_step = (lambda i: (i, first_step(i)))(submit())
    claim_step(running_step, worker="gpu-3:33", lease_seconds=600)
    _, stuck_step, _ = stuck_input()
    _, dead_step, _ = failed_input()
    _, row_step, _ = failed_input()

    page.goto(f"{live_server.url}/admin/pipeline_ops/steprun/")
    bulk(page, [failed_step.pk], "retry_steps")
    confirm(page, "r", expect_message="1 queued")
    assert status_of(failed_step) == StepStatus.QUEUED

    page.goto(f"{live_server.url}/admin/pipeline_ops/steprun/")
    bulk(page, [running_step.pk], "force_retry_steps")
    confirm(page, "f", expect_message="1 queued")
    assert status_of(running_step) == StepStatus.QUEUED

    page.goto(f"{live_server.url}/admin/pipeline_ops/steprun/")
    bulk(page, [stuck_step.pk], "release_leases")
    confirm(page, "worker died", expect_message="1 released")
    assert status_of(stuck_step) == StepStatus.RETRY_WAIT

    page.goto(f"{live_server.url}/admin/pipeline_ops/steprun/")
    bulk(page, [dead_step.pk], "discard_steps")
    confirm(page, "bad input", expect_message="1 discarded")
    assert status_of(dead_step) == StepStatus.DISCARDED

    page.goto(f"{live_server.url}/admin/pipeline_ops/steprun/?status__exact=FAILED")
    page.click(f"a.row-retry[href*='/steprun/{row_step.pk}/retry/']")
    confirm(page, "one row", expect_message="1 queued")
    assert status_of(row_step) == StepStatus.QUEUED
    assert "status__exact=FAILED" in page.url  # back on the list it came from


def test_failed_attempts_page_shows_the_steps_state_and_every_action_works(page, live_server):
    log_in(page, live_server, operator("senior", *ALL))
    _, bulk_step, bulk_attempt = failed_input()
    _, force_step, force_attempt = failed_input()
    _, row_step, _ = failed_input()
    _, done_step, _ = failed_input()
    from pipeline_ops.services import operations

    operations.step_runs_retry(step_runs=[done_step], actor=None, reason="earlier", source="cli")  # since retried

    page.goto(f"{live_server.url}/admin/pipeline_ops/failedattempt/")
    assert page.locator("#result_list td.field-step_now:has-text('Queued')").count() == 1
    assert page.locator("#result_list td.field-step_now:has-text('Failed')").count() == 3
    bulk(page, [bulk_attempt.pk], "retry_steps")
    confirm(page, "r", expect_message="1 queued")
    assert status_of(bulk_step) == StepStatus.QUEUED

    page.goto(f"{live_server.url}/admin/pipeline_ops/failedattempt/")
    bulk(page, [force_attempt.pk], "force_retry_steps")
    confirm(page, "f", expect_message="1 queued")
    assert status_of(force_step) == StepStatus.QUEUED

    page.goto(f"{live_server.url}/admin/pipeline_ops/failedattempt/")
    page.click(f"a.row-retry[href*='/steprun/{row_step.pk}/retry/']")
    confirm(page, "row", expect_message="1 queued")
    assert status_of(row_step) == StepStatus.QUEUED and "/failedattempt/" in page.url


def test_unknown_and_stuck_attempt_pages_actions(page, live_server):
    log_in(page, live_server, operator("senior", *ALL))
    _, unknown_step, unknown_attempt = unknown_input()
    _, unknown_step2, unknown_attempt2 = unknown_input()
    assert unknown_attempt.status == AttemptStatus.UNKNOWN

    page.goto(f"{live_server.url}/admin/pipeline_ops/unknownoutcomeattempt/")
    bulk(page, [unknown_attempt.pk], "retry_steps")
    confirm(page, "checked the provider: not billed", expect_message="1 queued")
    assert status_of(unknown_step) == StepStatus.QUEUED
    page.goto(f"{live_server.url}/admin/pipeline_ops/unknownoutcomeattempt/")
    bulk(page, [unknown_attempt2.pk], "force_retry_steps")
    confirm(page, "f", expect_message="1 queued")
    assert status_of(unknown_step2) == StepStatus.QUEUED

    _, stuck_step, stuck_attempt = stuck_input()
    _, stuck_step2, stuck_attempt2 = stuck_input()
    _, stuck_step3, _ = stuck_input()
    page.goto(f"{live_server.url}/admin/pipeline_ops/stuckattempt/")
    bulk(page, [stuck_attempt.pk], "release_leases")
    confirm(page, "worker died", expect_message="1 released")
    assert status_of(stuck_step) == StepStatus.RETRY_WAIT
    stuck_step.idempotency_record.refresh_from_db()
    assert stuck_step.idempotency_record.status == RecordStatus.FAILED  # released: due now for the reconciler
    page.goto(f"{live_server.url}/admin/pipeline_ops/stuckattempt/")
    bulk(page, [stuck_attempt2.pk], "retry_steps")
    confirm(page, "r", expect_message="1 queued")
    assert status_of(stuck_step2) == StepStatus.QUEUED
    page.goto(f"{live_server.url}/admin/pipeline_ops/stuckattempt/")
    page.click(f"a.row-retry[href*='/steprun/{stuck_step3.pk}/retry/']")
    confirm(page, "row", expect_message="1 queued")
    assert status_of(stuck_step3) == StepStatus.QUEUED
    assert Attempt.objects.filter(status=AttemptStatus.TIMED_OUT).count() == 3  # each stuck holder was taken over


# --- Retries and Dead ------------------------------------------------------------------------------------


def test_retries_page_row_and_bulk_retry_send_waiting_steps_now(page, live_server):
    log_in(page, live_server, operator("senior", *ALL))
    waiting = [waiting_input()[1] for _ in range(3)]
    failed_input()  # dead, not on this page

    page.goto(f"{live_server.url}/admin/pipeline_ops/retryingsteprun/")
    assert page.locator("#result_list tbody tr").count() == 3 == RetryingStepRun.objects.count()
    assert len(re.findall(r"in \d+ s", page.inner_text("#result_list"))) == 3  # due times, from next_attempt_at
    docs_shot(page, "retries.png")
    page.click(f"a.row-retry[href*='/steprun/{waiting[0].pk}/retry/']")
    assert "queued now instead of at its retry time" in page.inner_text("table.plan-acting")
    confirm(page, "row", expect_message="1 queued")
    assert status_of(waiting[0]) == StepStatus.QUEUED and "/retryingsteprun/" in page.url

    bulk(page, [waiting[1].pk], "retry_steps")
    confirm(page, "bulk", expect_message="1 queued")
    assert status_of(waiting[1]) == StepStatus.QUEUED
    page.goto(f"{live_server.url}/admin/pipeline_ops/retryingsteprun/")
    bulk(page, [waiting[2].pk], "force_retry_steps")
    confirm(page, "forced", expect_message="1 queued")
    assert status_of(waiting[2]) == StepStatus.QUEUED
    assert not RetryingStepRun.objects.exists()


def test_dead_page_row_retry_row_discard_bulk_discard_and_take_me_back(page, live_server):
    log_in(page, live_server, operator("senior", *ALL))
    dead = [failed_input()[1] for _ in range(4)]
    waiting_input()  # waiting, not dead

    page.goto(f"{live_server.url}/admin/pipeline_ops/deadsteprun/")
    assert page.locator("#result_list tbody tr").count() == 4 == DeadStepRun.objects.count()
    docs_shot(page, "dead.png")

    # "No, take me back" changes nothing.
    page.click(f"a.row-discard[href*='/steprun/{dead[0].pk}/discard/']")
    page.wait_for_selector("#operator-action")
    page.click("a.cancel-link")
    page.wait_for_url(re.compile(r"/deadsteprun/"))
    assert status_of(dead[0]) == StepStatus.FAILED and not OperatorAction.objects.exists()

    page.click(f"a.row-discard[href*='/steprun/{dead[0].pk}/discard/']")
    assert "never retried" in page.inner_text("table.plan-acting")
    confirm(page, "garbage input", expect_message="1 discarded")
    assert status_of(dead[0]) == StepStatus.DISCARDED and audit("discard", dead[0]).reason == "garbage input"

    page.click(f"a.row-retry[href*='/steprun/{dead[1].pk}/retry/']")
    confirm(page, "try again", expect_message="1 queued")
    assert status_of(dead[1]) == StepStatus.QUEUED

    bulk(page, [dead[2].pk, dead[3].pk], "discard_steps")
    confirm(page, "both garbage", expect_message="2 discarded")
    assert status_of(dead[2]) == status_of(dead[3]) == StepStatus.DISCARDED
    assert not DeadStepRun.objects.exists()


def test_retry_zero_is_not_clickable_and_writes_nothing(page, live_server):
    log_in(page, live_server, operator("senior", *ALL))
    pipeline_input, step, _ = failed_input()
    from pipeline_ops.services import operations

    operations.inputs_cancel(inputs=[pipeline_input], actor=None, reason="gone", source="cli")
    before = OperatorAction.objects.count()
    page.goto(f"{live_server.url}/admin/pipeline_ops/steprun/")
    bulk(page, [step.pk], "retry_steps")
    page.wait_for_selector("#operator-action")
    assert page.locator("#confirm-action").is_disabled()
    assert page.get_attribute("#confirm-action", "value") == "Retry (0)"
    page.fill("#id_reason", "trying anyway")
    # The button cannot be clicked; submitting its form anyway (a crafted POST) writes nothing either.
    page.evaluate("document.querySelector('#operator-action form').submit()")
    page.wait_for_selector("ul.messagelist")
    assert "nothing to do" in page.inner_text("ul.messagelist")
    assert OperatorAction.objects.count() == before and status_of(step) == StepStatus.FAILED and status_of(pipeline_input) == InputStatus.CANCELLED


# --- the dashboard --------------------------------------------------------------------------------------


def test_dashboard_links_lead_to_the_pages_with_the_databases_rows_and_its_numbers_go_live(page, live_server):
    alice = operator("alice", *ALL)
    for _ in range(2):
        failed_input()
    waiting_input()
    unknown_input()
    stuck_input()
    done, _, _ = failed_input()
    from pipeline_ops.services import operations

    operations.inputs_retry(inputs=[done], actor=None, reason="r", source="cli")
    run_worker(done)

    log_in(page, live_server, alice)
    page.click("#ops-dashboard-link a")
    page.wait_for_selector("#ops-dashboard")
    docs_shot(page, "dashboard.png")
    dashboard = page.url

    links = {
        "#link-retries": ("retryingsteprun", RetryingStepRun.objects.count()),
        "#link-dead": ("deadsteprun", DeadStepRun.objects.count()),
        "#card-fenced a": ("fencedattempt", Attempt.objects.filter(status=AttemptStatus.FENCED).count()),
        "#card-unknown a": ("unknownoutcomeattempt", Attempt.objects.filter(status=AttemptStatus.UNKNOWN).count()),
        "#card-stuck a": ("stuckattempt", Attempt.objects.filter(status=AttemptStatus.RUNNING, record__status=RecordStatus.PROCESSING,
                                                                    record__lease_expires_at__lt=timezone.now()).count()),
        "#card-failed a": ("failedattempt", Attempt.objects.filter(status=AttemptStatus.FAILED).count()),
    }
    for selector, (model, expected) in links.items():
        page.goto(dashboard)
        page.click(selector)
        page.wait_for_url(re.compile(rf"/{model}/"))
        rows = page.locator("#result_list tbody tr").count() if page.locator("#result_list").count() else 0
        assert rows == expected, (selector, rows, expected)
    for status in InputStatus.values:
        page.goto(dashboard)
        page.click(f"#inputs-by-status tr[data-status={status}] a")
        page.wait_for_url(re.compile(rf"status__exact={status}"))
        expected = PipelineInput.objects.filter(status=status).count()
        rows = page.locator("#result_list tbody tr").count() if page.locator("#result_list").count() else 0
        assert rows == expected, (status, rows, expected)
    page.goto(dashboard)
    page.click("#failure-rates tr[data-step=preprocess] td.failed a")
    page.wait_for_url(re.compile(r"/deadsteprun/\?step=preprocess"))
    assert page.locator("#result_list tbody tr").count() == DeadStepRun.objects.filter(step="preprocess").count()
    page.goto(dashboard)
    page.click("#dash-refresh")
    page.wait_for_selector("#ops-dashboard")

    # Live: a new dead step shows up without a click.
    dead_before = int(page.inner_text("[data-live=dead]"))
    failed_input()
    wait_for_a_poll_after_now(page)
    assert int(page.inner_text("[data-live=dead]")) == dead_before + 1
    assert int(page.inner_text("[data-live=dead]")) == DeadStepRun.objects.count()

    # The admin's own links: View site leads to the dashboard, the favicon exists.
    page.goto(f"{live_server.url}/admin/")
    page.click("#user-tools a:text('View site')")
    page.wait_for_selector("#ops-dashboard")
    assert page.evaluate("fetch('/favicon.ico').then(r => r.status)") == 200
