"""Fixtures for the pipeline tests: a real model server on 127.0.0.1, test steps, a queue drain.

The drain plays the worker's part without a cluster: it reads the real django-q2 ORM broker rows
that ``step_run_enqueue`` wrote, decodes them as a worker would, deletes them (the ack) and calls
the task function they name. The real-cluster tests live in tests/cluster/.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

import pytest
from django.db import connection
from django_q.conf import Conf
from django_q.models import OrmQ
from pydoc import locate

from idempotency.policy import RetryPolicy
from pipeline_ops.model_server import ModelServer
from pipeline_ops.queueing import STEP_TASK
from pipeline_ops.services.steps import step_run_execute
from pipeline_ops.steps import Step, is_transient, step_register, step_unregister


def queue_rows() -> list[dict]:
    """The step tasks on the ORM broker, decoded: [{'name', 'func', 'args', 'pk'}]."""
    rows = []
    for row in OrmQ.objects.filter(key=Conf.PREFIX).order_by("pk"):
        task = row.task
        rows.append({"pk": row.pk, "name": task.get("name"), "func": task.get("func"), "args": task.get("args")})
    return rows


def queued_ids() -> list[int]:
    return [row["args"][0] for row in queue_rows() if row["func"] == STEP_TASK]


def drain(*, now: datetime | None = None, max_rounds: int = 20) -> list[tuple[int, str]]:
    """Run queued step tasks until the queue is empty; returns (step_run_id, outcome) in order.

    With ``now`` the service is called with that claim clock (to make a retry or a lease due);
    otherwise the task function the row names is called, exactly as a worker would.
    """
    ran: list[tuple[int, str]] = []
    for _ in range(max_rounds):
        rows = queue_rows()
        if not rows:
            return ran
        for row in rows:
            OrmQ.objects.filter(pk=row["pk"]).delete()  # the ack
            step_run_id = row["args"][0]
            if now is None:
                outcome = locate(row["func"])(*row["args"])
            else:
                outcome = step_run_execute(step_run_id=step_run_id, now=now).outcome
            ran.append((step_run_id, outcome))
    raise AssertionError(f"queue still not empty after {max_rounds} rounds: {queue_rows()}")


@pytest.fixture
def model_server():
    server = ModelServer(host="127.0.0.1", port=0, seed=7).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def llm_endpoint(settings, model_server):
    settings.LLM_BASE_URL = model_server.url
    settings.LLM_TIMEOUT_SECONDS = 5.0
    settings.LLM_CONNECT_TIMEOUT_SECONDS = 2.0
    return model_server


@pytest.fixture
def test_steps(settings):
    """Register steps for one test; returns a function ``add(name, func, **policy)``."""
    added: list[str] = []

    def add(name: str, func: Callable, *, max_attempts: int = 3, lease_seconds: float = 30.0) -> Step:
        step = Step(
            name=name, func=func, lease_seconds=lease_seconds,
            policy=RetryPolicy(max_attempts=max_attempts, backoff_base_seconds=0.0, is_transient=is_transient),
        )
        step_register(step, replace_existing=True)
        added.append(name)
        return step

    yield add
    for name in added:
        step_unregister(name=name)


@pytest.fixture
def pipeline(settings):
    """Declare a pipeline for one test: ``pipeline("name", ["preprocess", "x"])``."""

    def declare(name: str, steps: list[str]) -> str:
        settings.PIPELINES = {**settings.PIPELINES, name: {"steps": steps, "description": "test"}}
        return name

    return declare


class StepThread(threading.Thread):
    """Runs one step run's task in its own thread and connection (a second worker)."""

    def __init__(self, step_run_id: int):
        super().__init__(daemon=True)
        self.step_run_id = step_run_id
        self.outcome: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.outcome = locate(STEP_TASK)(self.step_run_id)
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc
        finally:
            connection.close()

    def result(self, timeout: float = 30) -> str:
        self.join(timeout)
        assert not self.is_alive(), "the step thread did not finish"
        if self.error:
            raise self.error
        return self.outcome


def wait_for(condition: Callable[[], bool], *, timeout: float = 20, message: str = "condition") -> None:
    """Poll until ``condition()`` holds (states, not timings: the deadline only stops a hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message}")
