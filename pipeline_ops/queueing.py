"""Putting step tasks on the django-q2 queue: the only module that talks to the broker.

With the table brokers (``postgres``: pipeline_ops.pg_broker; django-q2's ``orm``) the queue row
is written through the same database alias as our models, so an enqueue inside a transaction
commits or rolls back with it (a free outbox). With Redis the
message is sent after commit, and the reconciler re-sends any that get lost.
"""
from __future__ import annotations

from functools import lru_cache

from django.conf import settings
from django.db import transaction
from django_q.brokers import get_broker
from django_q.tasks import async_task

STEP_TASK = "pipeline_ops.tasks.step_run_execute_task"


@lru_cache(maxsize=1)
def process_broker():
    # One broker per process: building a Redis client per enqueue costs 6-10x the throughput.
    return get_broker()


# The brokers whose queue is django-q2's table in our own database (``django_q_ormq``): an enqueue
# joins the caller's transaction, and a queue row can be read, counted and deleted with SQL.
TABLE_BROKERS = frozenset({"orm", "postgres"})


def uses_transactional_broker() -> bool:
    return settings.PIPELINE_OPS_BROKER in TABLE_BROKERS


def _enqueue(func: str, arg, *, name: str) -> None:
    """ORM broker: the queue row joins the caller's transaction (an outbox). Redis: sent after
    the commit, so a rolled-back transaction sends nothing."""

    def send() -> None:
        async_task(func, arg, broker=process_broker(), task_name=name)

    if uses_transactional_broker():
        send()
    else:
        transaction.on_commit(send)


def step_task_payload(*, step_run_id: int) -> str:
    """The signed package of one step task, exactly what ``async_task`` hands a broker (the same
    task dict, ``pre_enqueue`` signal and signature): for the callers that write queue rows in a
    statement of their own (a step's completion, a bulk submission), so that a worker cannot tell
    their tasks from ``step_run_enqueue``'s."""
    from django.utils import timezone
    from django_q.conf import Conf
    from django_q.humanhash import uuid
    from django_q.signals import pre_enqueue
    from django_q.signing import SignedPackage

    tag = uuid()
    task = {"id": tag[1], "name": f"step_run:{step_run_id}", "func": STEP_TASK, "args": (step_run_id,)}
    if Conf.CACHED:
        task["cached"] = Conf.CACHED
    if Conf.ACK_FAILURES:
        task["ack_failure"] = Conf.ACK_FAILURES
    task["kwargs"] = {}
    task["started"] = timezone.now()
    pre_enqueue.send(sender="django_q", task=task)
    return SignedPackage.dumps(task)


def step_task_row(*, step_run_id: int) -> tuple[str, str]:
    """The queue row ``(key, payload)`` of one step task on the table brokers."""
    from django_q.conf import Conf

    return process_broker().list_key or Conf.CLUSTER_NAME, step_task_payload(step_run_id=step_run_id)


def step_run_enqueue(*, step_run_id: int) -> None:
    """Queue one execution of the step run. Safe to call twice: the task is guarded."""
    _enqueue(STEP_TASK, step_run_id, name=f"step_run:{step_run_id}")


BULK_TASK = "pipeline_ops.tasks.bulk_action_task"


def bulk_action_enqueue(*, bulk_id: int) -> None:
    """Queue the next slice of a background operator action (``services.bulk``). Safe to call
    twice: a second delivery of a slice finds the position moved and does nothing."""
    _enqueue(BULK_TASK, bulk_id, name=f"bulk_action:{bulk_id}")
