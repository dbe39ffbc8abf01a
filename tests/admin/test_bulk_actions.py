"""Operator actions on many targets run in the background (services.bulk): the request plans and
returns, django-q2 tasks (the real ORM broker rows, run as a worker would) work through slices,
the background action's page shows progress and the summary, and a repeated delivery acts on
nothing twice."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django_q.models import OrmQ

from pipeline_ops.models import BulkAction, OperatorAction, StepRun
from pipeline_ops.queueing import BULK_TASK
from pipeline_ops.reconciler import reconcile_once
from pipeline_ops.services import bulk
from pipeline_ops.states import StepStatus

from ..pipeline.conftest import queue_rows
from .helpers import failed_input, operator

pytestmark = pytest.mark.django_db


@pytest.fixture
def small_bulk(settings):
    settings.PIPELINE_OPS_BULK_THRESHOLD = 3
    settings.PIPELINE_OPS_BULK_SLICE = 2
    settings.PIPELINE_OPS_RETRY_RATE = 0  # all at once: the spread has tests of its own


def bulk_rows() -> list[dict]:
    return [row for row in queue_rows() if row["func"] == BULK_TASK]


def run_bulk_tasks(*, max_rounds: int = 20) -> int:
    """Deliver the background action's tasks as a worker would (ack, then run) until none is left."""
    from pydoc import locate

    delivered = 0
    for _ in range(max_rounds):
        rows = bulk_rows()
        if not rows:
            return delivered
        for row in rows:
            OrmQ.objects.filter(pk=row["pk"]).delete()
            locate(row["func"])(*row["args"])
            delivered += 1
    raise AssertionError("the background action never finished")


def test_retry_of_many_steps_runs_in_the_background_and_its_page_shows_the_summary(small_bulk):
    failed = [failed_input()[1] for _ in range(5)]
    client = Client()
    client.force_login(operator("bea", "retry_steprun", "view_bulkaction", "view_operatoraction"))
    url = reverse("admin:pipeline_ops_deadsteprun_changelist")

    response = client.post(url, {"action": "retry_steps", "_selected_action": [s.pk for s in failed], "post": "yes",
                                 "reason": "provider back (INC-12)"})

    started = BulkAction.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("admin:pipeline_ops_bulkaction_change", args=[started.pk])
    # The request wrote the plan and one task, and acted on nothing.
    assert started.status == BulkAction.Status.QUEUED and started.total == 5 and started.reason == "provider back (INC-12)"
    assert not OperatorAction.objects.exists()
    assert set(StepRun.objects.filter(pk__in=[s.pk for s in failed]).values_list("status", flat=True)) == {StepStatus.FAILED}
    assert len(bulk_rows()) == 1
    page = client.get(response["Location"]).content.decode()
    assert 'http-equiv="refresh"' in page and "0 of 5" in page

    assert run_bulk_tasks() == 3  # slices of 2, 2 and 1, each queued by the one before

    started.refresh_from_db()
    assert started.status == BulkAction.Status.DONE and (started.position, started.done, started.skipped) == (5, 5, 0)
    assert started.message == "5 done, 0 skipped (5 step runs selected)" and started.finished_at is not None
    assert set(StepRun.objects.filter(pk__in=[s.pk for s in failed]).values_list("status", flat=True)) == {StepStatus.QUEUED}
    audit = OperatorAction.objects.filter(batch=started.batch)
    assert audit.count() == 5 and set(audit.values_list("actor_name", "outcome")) == {("bea", "done")}
    page = client.get(response["Location"]).content.decode()
    assert 'http-equiv="refresh"' not in page and "5 of 5" in page and "5 done, 0 skipped (5 step runs selected)" in page
    rows = client.get(reverse("admin:pipeline_ops_operatoraction_changelist") + f"?q={started.batch}").content.decode()
    assert rows.count('class="field-target"') == 5


def test_small_selection_still_runs_in_the_request(small_bulk):
    failed = [failed_input()[1] for _ in range(3)]
    client = Client()
    client.force_login(operator("bea", "retry_steprun"))

    response = client.post(reverse("admin:pipeline_ops_deadsteprun_changelist"),
                           {"action": "retry_steps", "_selected_action": [s.pk for s in failed], "post": "yes", "reason": "r"})

    assert response.status_code == 302 and not BulkAction.objects.exists()
    assert OperatorAction.objects.filter(outcome="done").count() == 3


def test_a_slice_delivered_twice_acts_on_nothing_twice(small_bulk):
    failed = [failed_input()[1] for _ in range(4)]
    started = bulk.bulk_start(action=OperatorAction.Action.RETRY, target_type="step_run", target_ids=[s.pk for s in failed],
                              actor=None, reason="repeat me", source="cli")

    first = bulk.bulk_run_slice(bulk_id=started.pk)
    # A second delivery of the same slice that began before the first recorded its position.
    BulkAction.objects.filter(pk=started.pk).update(position=0)
    again = bulk.bulk_run_slice(bulk_id=started.pk)
    run_bulk_tasks()

    assert first.position == 2 and again.position == 2
    started.refresh_from_db()
    # Counted per target: the repeat's "already queued" rows do not make done targets skipped.
    assert started.status == BulkAction.Status.DONE and (started.done, started.skipped) == (4, 0)
    done = list(OperatorAction.objects.filter(batch=started.batch, outcome="done").values_list("target_id", flat=True))
    assert sorted(done) == sorted(str(s.pk) for s in failed)  # each target acted on once
    skipped = OperatorAction.objects.filter(batch=started.batch, outcome="skipped")
    assert sorted(skipped.values_list("target_id", flat=True)) == sorted([str(failed[0].pk), str(failed[1].pk)])
    assert all("queued" in m.lower() for m in skipped.values_list("message", flat=True))


def test_stale_delivery_of_a_finished_slice_does_nothing(small_bulk):
    failed = [failed_input()[1] for _ in range(2)]
    started = bulk.bulk_start(action=OperatorAction.Action.RETRY, target_type="step_run", target_ids=[s.pk for s in failed],
                              actor=None, reason="r", source="cli")
    run_bulk_tasks()
    before = OperatorAction.objects.count()

    assert bulk.bulk_run_slice(bulk_id=started.pk) is None
    assert OperatorAction.objects.count() == before


def test_background_action_whose_task_was_lost_is_sent_again_by_the_reconciler(small_bulk, settings):
    failed = [failed_input()[1] for _ in range(2)]
    started = bulk.bulk_start(action=OperatorAction.Action.RETRY, target_type="step_run", target_ids=[s.pk for s in failed],
                              actor=None, reason="r", source="cli")
    OrmQ.objects.filter(pk__in=[row["pk"] for row in bulk_rows()]).delete()  # the broker lost it
    started.refresh_from_db()

    assert reconcile_once(now=started.updated_at + timedelta(seconds=60)).bulk_actions == []  # not stalled yet
    report = reconcile_once(now=started.updated_at + timedelta(seconds=settings.PIPELINE_OPS_BULK_STALL_SECONDS + 1))

    assert report.bulk_actions == [started.pk] and len(bulk_rows()) == 1
    run_bulk_tasks()
    started.refresh_from_db()
    assert started.status == BulkAction.Status.DONE and started.done == 2


def test_background_action_refuses_an_empty_reason_or_no_targets():
    with pytest.raises(ValueError, match="reason"):
        bulk.bulk_start(action=OperatorAction.Action.RETRY, target_type="step_run", target_ids=[1], actor=None, reason=" ", source="cli")
    with pytest.raises(ValueError, match="at least one target"):
        bulk.bulk_start(action=OperatorAction.Action.RETRY, target_type="step_run", target_ids=[], actor=None, reason="r", source="cli")
    with pytest.raises(ValueError, match="cannot run in the background"):
        bulk.bulk_start(action=OperatorAction.Action.CANCEL, target_type="step_run", target_ids=[1], actor=None, reason="r", source="cli")
    assert not BulkAction.objects.exists()
