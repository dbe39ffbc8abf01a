"""Operator actions on many targets, in the background.

An action on more than ``PIPELINE_OPS_BULK_THRESHOLD`` targets is planned in the request, which
then writes only a ``BulkAction`` row and its first task, in one transaction (with the ORM broker
the queue row is part of it). A django-q2 task works through ``PIPELINE_OPS_BULK_SLICE`` targets,
each in its own transaction through the very service a small action calls (the same rules,
locks and audit rows, under the bulk's ``batch``), records how far it got and queues itself for
the rest in the transaction that records it. So no request holds a worker for minutes, and no
task outlives django-q2's timeout.

Safe to repeat: the position moves only from the value the slice started at, so of two
deliveries of one slice only one goes on; a target worked twice is re-decided under its row
locks (a retried step is then "already queued") and never acted on twice. The counts are read
off the audit rows, not added up by the slices. A slice that meets an infrastructure error
raises (django-q2 records it; the reconciler re-sends a bulk that stopped moving); any other
error ends the bulk FAILED with the error, the targets before it done and audited.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Coalesce

from idempotency.clock import db_now_expression
from idempotency.faults import is_infrastructure_error

from ..models import BulkAction, OperatorAction, PipelineInput, StepRun
from ..queueing import bulk_action_enqueue
from . import discard, operations
from .operations import _actor_name, _require_reason

log = logging.getLogger(__name__)

Action = OperatorAction.Action

# (action, target type) -> runs one slice of targets through the service a small action calls,
# as the bulk's actor, with its reason and under its batch.
_RUNNERS: dict[tuple[str, str], Callable[[list, BulkAction], operations.ActionReport]] = {
    (Action.RETRY, "step_run"): lambda ids, bulk: operations.step_runs_retry(step_runs=ids, spread_from=bulk.done, **_as(bulk)),
    (Action.FORCE_RETRY, "step_run"): lambda ids, bulk: operations.step_runs_retry(
        step_runs=ids, force=True, spread_from=bulk.done, **_as(bulk)),
    (Action.RETRY, "input"): lambda ids, bulk: operations.inputs_retry(inputs=ids, spread_from=bulk.done, **_as(bulk)),
    (Action.FORCE_RETRY, "input"): lambda ids, bulk: operations.inputs_retry(inputs=ids, force=True, spread_from=bulk.done, **_as(bulk)),
    (Action.CANCEL, "input"): lambda ids, bulk: operations.inputs_cancel(inputs=ids, **_as(bulk)),
    (Action.RELEASE_LEASE, "step_run"): lambda ids, bulk: operations.step_runs_release_lease(step_runs=ids, **_as(bulk)),
    (Action.DISCARD, "step_run"): lambda ids, bulk: discard.step_runs_discard(step_runs=ids, **_as(bulk)),
}
_MODELS = {"step_run": StepRun, "input": PipelineInput}


def _as(bulk: BulkAction) -> dict:
    return {"actor": bulk.actor, "reason": bulk.reason, "source": bulk.source, "batch": bulk.batch}


def bulk_wanted(target_count: int) -> bool:
    """Whether an action on this many targets runs in the background."""
    return target_count > settings.PIPELINE_OPS_BULK_THRESHOLD


def bulk_start(*, action: str, target_type: str, target_ids: list, actor, reason: str, source: str) -> BulkAction:
    """Record the action and queue its first slice; returns at once. Raises ValueError for an
    unknown action or target type, an empty reason, an unknown source or no targets."""
    if (action, target_type) not in _RUNNERS:
        raise ValueError(f"{action!r} on {target_type!r} cannot run in the background.")
    reason = _require_reason(reason, source)
    ids = [str(pk) for pk in target_ids]
    if not ids:
        raise ValueError("A background action needs at least one target.")
    with transaction.atomic():
        bulk = BulkAction.objects.create(
            batch=uuid.uuid4(), action=action, target_type=target_type, target_ids=ids,
            actor=actor if getattr(actor, "pk", None) else None, actor_name=_actor_name(actor), source=source, reason=reason,
        )
        bulk_action_enqueue(bulk_id=bulk.pk)
    return bulk


def bulk_run_slice(*, bulk_id: int) -> BulkAction | None:
    """Work through the next slice of the bulk's targets; queue the next slice, or finish.
    Returns the bulk as it is after the slice, or None when there was nothing to do (finished,
    failed, unknown, or another delivery of this slice went on first)."""
    bulk = BulkAction.objects.filter(pk=bulk_id, status__in=[BulkAction.Status.QUEUED, BulkAction.Status.RUNNING]).first()
    if bulk is None:
        return None
    BulkAction.objects.filter(pk=bulk.pk).update(
        status=BulkAction.Status.RUNNING, started_at=Coalesce(F("started_at"), db_now_expression()), updated_at=db_now_expression(),
    )
    start = bulk.position
    stop = min(start + settings.PIPELINE_OPS_BULK_SLICE, bulk.total)
    run = _RUNNERS[(bulk.action, bulk.target_type)]
    model = _MODELS[bulk.target_type]
    # Targets deleted since the plan are simply not found: the services skip what they cannot load.
    ids = [model._meta.pk.to_python(pk) for pk in bulk.target_ids[start:stop]]
    try:
        run(ids, bulk)
    except Exception as exc:
        if is_infrastructure_error(exc):
            raise  # the platform's: this slice is delivered again (django-q2, or the reconciler)
        log.exception("background action %s failed at target %s", bulk.pk, start)
        _finish(bulk, start=start, position=start, status=BulkAction.Status.FAILED,
                message=f"stopped by an error after {start} of {bulk.total} targets: {type(exc).__name__}: {exc}"[:2000])
        return BulkAction.objects.get(pk=bulk.pk)
    finished = stop >= bulk.total
    moved = _finish(bulk, start=start, position=stop, status=BulkAction.Status.DONE if finished else BulkAction.Status.RUNNING)
    return BulkAction.objects.get(pk=bulk.pk) if moved else None


def _finish(bulk: BulkAction, *, start: int, position: int, status: str, message: str = "") -> bool:
    """Record the slice's end (position, counts from the audit rows, status), and queue the next
    slice in the same transaction. False when another delivery of the slice got there first."""
    with transaction.atomic():
        # Per target, not per audit row: a slice delivered again re-audits its targets as
        # skipped ("already queued"), and a target acted on once is done, whatever came after.
        audit = OperatorAction.objects.filter(batch=bulk.batch)
        done = audit.filter(outcome="done").values("target_id").distinct().count()
        skipped = audit.values("target_id").distinct().count() - done
        if status == BulkAction.Status.DONE:
            # Counted from the audit rows, which are per target the service acts on: a retry of
            # inputs audits each of their steps, so the selection is named apart.
            message = f"{done} done, {skipped} skipped ({bulk.total} {bulk.target_type.replace('_', ' ')}s selected)"
        ending = status != BulkAction.Status.RUNNING
        moved = BulkAction.objects.filter(pk=bulk.pk, position=start, status=BulkAction.Status.RUNNING).update(
            position=position, done=done, skipped=skipped, status=status, message=message, updated_at=db_now_expression(),
            **({"finished_at": db_now_expression()} if ending else {}),
        )
        if moved and not ending:
            bulk_action_enqueue(bulk_id=bulk.pk)
    return bool(moved)
