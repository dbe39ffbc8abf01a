"""The hot path is a budget: statements per guarded step, as ceilings (the keyed POST's:
tests/api/test_statement_budget.py).

Counted with Django's own query capture (every statement and every BEGIN/COMMIT the connection
sends), through the front door: the task function a worker calls, and ``APIClient``. A change
that adds a round trip to the hot path fails here instead of silently costing throughput. The
figures are ceilings, not timings: what a statement costs is the benches' business.
"""
from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_q.models import OrmQ

from pipeline_ops.delivery import delivery_set
from pipeline_ops.models import StepRun
from pipeline_ops.services.inputs import input_submit
from pipeline_ops.services.steps import Outcome
from pipeline_ops.states import InputStatus, StepStatus
from pipeline_ops.tasks import step_run_execute_task

pytestmark = pytest.mark.django_db(transaction=True)

# PostgreSQL: the read, the claim, the completion (one statement each); the last step adds the
# input's roll-up in its completion's statement, which then needs a transaction (BEGIN, COMMIT).
# SQLite runs the same protocol as ORM transactions (no network: its statements cost microseconds).
STEP_BUDGET = {
    "postgresql": {"first": 3, "middle": 3, "last": 5},
    "sqlite": {"first": 21, "middle": 16, "last": 16},
}


def _delivered(step_run_id: int) -> int:
    """The queue row a worker would have been handed for this step (as django-q2's pusher does)."""
    return OrmQ.objects.filter(key=OrmQ.objects.values_list("key", flat=True).first()).order_by("-pk").values_list("pk", flat=True).first()


def test_each_guarded_step_stays_within_its_statement_budget_when_it_succeeds():
    pipeline_input = input_submit(pipeline="default", payload={"text": "A calm and useful sentence."}, scope="budget").input
    budget = STEP_BUDGET[connection.vendor]
    for position, name in enumerate(("first", "middle", "last")):
        step_run = StepRun.objects.get(input=pipeline_input, position=position)
        ack_id = _delivered(step_run.pk)
        token = delivery_set(ack_id)
        try:
            with CaptureQueriesContext(connection) as statements:
                outcome = step_run_execute_task(step_run.pk)
        finally:
            token.var.reset(token)
        assert outcome == Outcome.SUCCEEDED
        assert len(statements) <= budget[name], "\n".join(q["sql"][:160] for q in statements.captured_queries)
        # The ack is part of the completion: the delivered row is gone, the next step's is there.
        assert not OrmQ.objects.filter(pk=ack_id).exists()
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.SUCCEEDED
    assert set(StepRun.objects.filter(input=pipeline_input).values_list("status", flat=True)) == {StepStatus.SUCCEEDED}
    assert not OrmQ.objects.exists()
