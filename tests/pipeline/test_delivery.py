"""The worker's announcement of a task (django-q2's signals) tells the step which queue row to
acknowledge in its completion, and only on the brokers whose queue is a table of ours."""
from __future__ import annotations

import contextvars

from django_q.signals import post_execute_in_worker, pre_execute

from pipeline_ops.delivery import delivery_ack_id


def _announce(task: dict) -> int | None:
    """What the task would see: the signal fires in the worker's context, then the task runs."""

    def run() -> int | None:
        pre_execute.send(sender="django_q", func=None, task=task)
        seen = delivery_ack_id()
        post_execute_in_worker.send(sender="django_q", func=None, task=task)
        assert delivery_ack_id() is None  # the next task starts with none
        return seen

    return contextvars.copy_context().run(run)


def test_running_task_knows_its_queue_row_when_the_broker_is_a_table(settings):
    settings.PIPELINE_OPS_BROKER = "orm"
    assert _announce({"ack_id": 41, "func": "x"}) == 41
    settings.PIPELINE_OPS_BROKER = "postgres"
    assert _announce({"ack_id": "42", "func": "x"}) == 42


def test_running_task_acknowledges_nothing_early_when_the_broker_is_redis(settings):
    settings.PIPELINE_OPS_BROKER = "redis"
    assert _announce({"ack_id": "1700000000-0", "func": "x"}) is None
