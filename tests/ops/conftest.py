"""A small, real world for the operators' tools: inputs submitted through the bulk service and
steps run through the real runner task (in-process), with two test-only steps that fail."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.utils import timezone

from idempotency import guard
from idempotency.policy import NO_RETRY
from pipeline_ops.models import PipelineInput, StepRun
from pipeline_ops.services.submissions import inputs_submit_stream
from pipeline_ops.steps import PermanentStepError, Step, step_register, step_unregister
from pipeline_ops.tasks import step_run_execute_task

OPS_PIPELINES = {
    "ops_boom": {"description": "test-only: fails permanently", "steps": ["ops_boom"]},
    "ops_value": {"description": "test-only: raises ValueError", "steps": ["ops_value"]},
}


class OpsBoomError(PermanentStepError):
    pass


def _boom(ctx):
    raise OpsBoomError("the test step always fails")


def _value(ctx):
    raise ValueError("bad value in the test step")


@pytest.fixture
def ops_steps(settings):
    """Registers the two failing test steps and their pipelines for one test."""
    settings.PIPELINES = {**settings.PIPELINES, **OPS_PIPELINES}
    step_register(Step(name="ops_boom", func=_boom, policy=NO_RETRY, lease_seconds=30, timeout_seconds=30), replace_existing=True)
    step_register(Step(name="ops_value", func=_value, policy=NO_RETRY, lease_seconds=30, timeout_seconds=30), replace_existing=True)
    yield
    step_unregister(name="ops_boom")
    step_unregister(name="ops_value")


def submit(pipeline: str, rows: list[dict]) -> list[PipelineInput]:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    report = inputs_submit_stream(stream=io.StringIO(text), fmt="jsonl", pipeline=pipeline)
    assert report.created == len(rows)
    return list(PipelineInput.objects.filter(pipeline=pipeline).order_by("created_at"))


def run_first_steps(inputs) -> list[str]:
    """Runs each input's first step through the real task function; returns the outcomes."""
    return [
        step_run_execute_task(StepRun.objects.get(input=pipeline_input, position=0).pk) for pipeline_input in inputs
    ]


@dataclass
class World:
    ok: list[PipelineInput]
    boom: list[PipelineInput]
    value: list[PipelineInput]


@pytest.fixture
def world(ops_steps) -> World:
    """3 default inputs with preprocess done, 2 failed on ops_boom, 1 failed on ops_value, and one
    API-scope key that went through the incident (attempt 1 fenced) and was replayed once."""
    ok = submit("default", [{"text": f"A fine day number {i}. Everything worked."} for i in range(3)])
    boom = submit("ops_boom", [{"text": f"boom {i}"} for i in range(2)])
    value = submit("ops_value", [{"text": "value"}])
    assert run_first_steps(ok) == ["succeeded"] * 3
    assert run_first_steps(boom + value) == ["failed"] * 3

    t0 = timezone.now()
    first = guard.claim(scope="api:client-9", key="k-1", operation="POST /api/v1/inputs/", fingerprint="f" * 64, lease_seconds=1, now=t0)
    second = guard.claim(
        scope="api:client-9", key="k-1", operation="POST /api/v1/inputs/", fingerprint="f" * 64, lease_seconds=30,
        now=t0 + timedelta(seconds=5),
    )
    assert isinstance(second, guard.Claimed)
    guard.complete(attempt=second.attempt, result={"status": 201})
    assert guard.complete(attempt=first.attempt, result={"status": 201}).fenced
    assert isinstance(
        guard.claim(scope="api:client-9", key="k-1", operation="POST /api/v1/inputs/", fingerprint="f" * 64), guard.Replay
    )
    return World(ok=ok, boom=boom, value=value)
