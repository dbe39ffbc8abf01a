"""The llm step against the real fault-injecting ModelServer on 127.0.0.1 (in-process thread)."""
from __future__ import annotations

import socket
from datetime import timedelta

import pytest

from idempotency.models import Attempt
from idempotency.states import AttemptStatus
from pipeline_ops.models import StepOutput, StepRun
from pipeline_ops.reconciler import reconcile_once
from pipeline_ops.services.inputs import input_submit
from pipeline_ops.services.steps import Outcome
from pipeline_ops.states import InputStatus, StepStatus

from .conftest import drain

# Single-threaded: the test's transaction is enough (and much cheaper than a flush).
pytestmark = pytest.mark.django_db

TEXT = "Our order arrived two weeks late and the box was crushed. Support never answered. Terrible experience."


def llm_run(pipeline_input) -> StepRun:
    return StepRun.objects.get(input=pipeline_input, step="llm")


def attempts(step_run: StepRun) -> list[Attempt]:
    return list(Attempt.objects.filter(record__scope="step", record__key=step_run.idempotency_key).order_by("number"))


def submit():
    return input_submit(pipeline="llm", payload={"text": TEXT}, scope="tests").input


def test_llm_step_records_latency_and_tokens_when_model_answers(llm_endpoint):
    llm_endpoint.configure(latency_ms=20)
    pipeline_input = submit()

    assert [outcome for _, outcome in drain()] == [Outcome.SUCCEEDED] * 3

    run = llm_run(pipeline_input)
    output = StepOutput.objects.get(step_run=run).output
    assert output["content"].startswith("Summary (")
    (attempt,) = attempts(run)
    assert attempt.details["latency_ms"] >= 20
    assert attempt.details["total_tokens"] == output["usage"]["total_tokens"] > 0
    assert attempt.details["prompt_tokens"] > 0 and attempt.details["completion_tokens"] > 0
    # The step's own key went to the provider, once.
    assert llm_endpoint.calls_by_key() == {run.idempotency_key: 1}


def test_llm_retry_reaches_model_with_same_key_when_first_call_timed_out(llm_endpoint, settings):
    # The incident: the model processes the call, then answers after the client gave up.
    settings.LLM_TIMEOUT_SECONDS = 0.5
    settings.PIPELINE_STEP_POLICIES = {"llm": {"backoff_base_seconds": 0}}
    llm_endpoint.configure(stall_rate=1.0, stall_seconds=5, honour_keys=True)
    pipeline_input = submit()

    assert [outcome for _, outcome in drain()] == [Outcome.SUCCEEDED, Outcome.SUCCEEDED, Outcome.RETRY_SCHEDULED]
    run = llm_run(pipeline_input)
    (first,) = attempts(run)
    assert first.status == AttemptStatus.UNKNOWN and "may have been processed" in first.error_message
    assert run.status == StepStatus.RETRY_WAIT
    assert llm_endpoint.stats()["processed"] == 1  # it did happen

    llm_endpoint.configure(stall_rate=0.0)
    assert reconcile_once().due_retries == [run.pk]
    assert drain() == [(run.pk, Outcome.SUCCEEDED)]

    stats = llm_endpoint.stats()
    assert stats["calls_by_key"] == {run.idempotency_key: 2}
    assert stats["processed"] == 1 and stats["replayed"] == 1  # the provider did the work once
    output = StepOutput.objects.get(step_run=run).output
    assert output["completion_id"] == llm_endpoint._answers[run.idempotency_key]["id"]
    assert [a.status for a in attempts(run)] == [AttemptStatus.UNKNOWN, AttemptStatus.SUCCEEDED]
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.SUCCEEDED


def test_llm_step_waits_retry_after_when_model_rate_limits(llm_endpoint):
    llm_endpoint.configure(rate_429=1.0, retry_after=45)
    pipeline_input = submit()

    assert drain()[-1][1] == Outcome.RETRY_SCHEDULED
    run = llm_run(pipeline_input)
    (first,) = attempts(run)
    assert first.status == AttemptStatus.FAILED and first.details["http_status"] == 429
    assert run.next_attempt_at >= first.finished_at + timedelta(seconds=45)
    assert reconcile_once().enqueued == 0  # not due yet

    llm_endpoint.configure(rate_429=0.0)
    due = run.next_attempt_at + timedelta(seconds=1)
    assert reconcile_once(now=due).due_retries == [run.pk]
    assert drain(now=due) == [(run.pk, Outcome.SUCCEEDED)]


@pytest.mark.parametrize("fault", ["server_error", "unreachable"])
def test_llm_step_retries_when_error_is_transient(llm_endpoint, settings, fault):
    if fault == "server_error":
        llm_endpoint.configure(error_rate=1.0)
    else:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            settings.LLM_BASE_URL = f"http://127.0.0.1:{probe.getsockname()[1]}"
    pipeline_input = submit()

    assert drain()[-1][1] == Outcome.RETRY_SCHEDULED
    run = llm_run(pipeline_input)
    assert run.status == StepStatus.RETRY_WAIT
    assert attempts(run)[0].error_type == "TransientStepError"


def test_llm_step_fails_at_once_when_endpoint_refuses_request(llm_endpoint, settings):
    settings.LLM_BASE_URL = llm_endpoint.url + "/no-such-api"  # a 404: no retry can fix it
    pipeline_input = submit()

    assert drain()[-1][1] == Outcome.FAILED
    run = llm_run(pipeline_input)
    assert run.status == StepStatus.FAILED and "404" in run.last_error
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.FAILED


def test_llm_step_fails_with_clear_message_when_no_endpoint_is_configured(settings):
    settings.LLM_BASE_URL = ""
    pipeline_input = submit()
    drain()
    assert "LLM_BASE_URL is not set" in llm_run(pipeline_input).last_error


def test_llm_step_times_out_at_policy_timeout_when_overridden(llm_endpoint, settings):
    settings.LLM_TIMEOUT_SECONDS = 30
    settings.PIPELINE_STEP_POLICIES = {"llm": {"timeout_seconds": 0.4}}
    llm_endpoint.configure(stall_rate=1.0, stall_seconds=5)
    pipeline_input = submit()
    assert drain()[-1][1] == Outcome.RETRY_SCHEDULED
    (first,) = attempts(llm_run(pipeline_input))
    assert first.status == AttemptStatus.UNKNOWN and "after 0.4s" in first.error_message
