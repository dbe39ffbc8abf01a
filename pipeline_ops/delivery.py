"""Which queue row the running task was delivered from, so the step's completion can acknowledge it.

django-q2 acknowledges a finished task in its monitor process with a DELETE of the task's queue
row in a transaction of its own: one more commit per step, and a window in which a step that has
completed still has a row that a cluster may deliver again once its lock expires. On the brokers
whose queue is a table of our own database (django-q2's ``django_q_ormq``), the completion deletes
that row in the transaction that completes the step: the ack commits with the result, or neither
does. django-q2's own acknowledge then deletes nothing (a delete by id of a row that is gone).

The worker announces each task with the ``pre_execute`` signal (task dict with its ``ack_id``)
in the process and thread that then runs it; the id is kept in a context variable until
``post_execute_in_worker``. A task run in any other way (tests' drains, ``sync``) has none, and
nothing is acknowledged early.
"""
from __future__ import annotations

import contextvars

_ack_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("pipeline_ops_delivery_ack_id", default=None)


def delivery_ack_id() -> int | None:
    """The queue row (``django_q_ormq.id``) of the task running now, on table-backed brokers."""
    return _ack_id.get()


def delivery_set(ack_id: int | None) -> contextvars.Token:
    """Mark ``ack_id`` as the running task's queue row (the worker's signal, and tests)."""
    return _ack_id.set(ack_id)


def _on_execute(sender, func=None, task=None, **kwargs) -> None:
    from .queueing import uses_transactional_broker

    ack_id = (task or {}).get("ack_id")
    # Only a row of the ORM table is ours to delete; Redis ids are not rows.
    _ack_id.set(int(ack_id) if ack_id is not None and uses_transactional_broker() else None)


def _on_executed(sender, func=None, task=None, **kwargs) -> None:
    _ack_id.set(None)


def delivery_connect() -> None:
    """Connect the signal handlers (AppConfig.ready); they cost nothing outside a worker."""
    from django_q.signals import post_execute_in_worker, pre_execute

    pre_execute.connect(_on_execute, dispatch_uid="pipeline_ops.delivery.execute")
    post_execute_in_worker.connect(_on_executed, dispatch_uid="pipeline_ops.delivery.executed")
