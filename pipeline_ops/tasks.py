"""django-q2 tasks: thin adapters that receive ids, call one service and return quietly.

Each is safe to run twice (the ORM broker redelivers; the reconciler re-sends): the guard and
the conditional UPDATEs inside the services make a second run a no-op.
"""
from __future__ import annotations

from .observability.logging import log_context_isolated
from .reconciler import reconcile_once
from .services.steps import step_run_execute


@log_context_isolated
def step_run_execute_task(step_run_id: int) -> str:
    """Run one step run under the guard; returns what happened (see ``services.steps.Outcome``)."""
    return step_run_execute(step_run_id=int(step_run_id)).outcome


def reconcile_task() -> dict:
    """One reconciler pass (the django-q2 schedule 'pipeline_ops.reconcile' runs it every minute)."""
    return reconcile_once().as_dict()


@log_context_isolated
def bulk_action_task(bulk_id: int) -> str:
    """One slice of a background operator action (``services.bulk``); returns its status."""
    from .services.bulk import bulk_run_slice

    bulk = bulk_run_slice(bulk_id=int(bulk_id))
    return bulk.status if bulk is not None else "nothing to do"
