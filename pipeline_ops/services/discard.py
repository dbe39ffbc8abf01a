"""Discard: an operator gives up on a dead step (Sidekiq's "Delete" on its Dead page), audited.

Same shape as ``services.operations``: a plan that writes nothing (the confirmation page), then
per target one transaction that locks the step run and then its key (the project's lock order,
docs/guard.md: step runs -> input -> key; the input is not touched), re-decides from what it
finds, moves the step with a conditional UPDATE (FAILED -> DISCARDED only) and writes the
``OperatorAction`` row in that same transaction.

The key stays FAILED and the input keeps its status (it did fail): a discarded step is never
retried (``STEP_TRANSITIONS`` has no move out of DISCARDED) and leaves the Dead page.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from django.db import transaction

from idempotency.clock import db_now
from idempotency.models import IdempotencyRecord
from idempotency.states import RecordStatus

from ..models import OperatorAction, StepRun
from ..states import StepStatus, step_sources
from .operations import ActionReport, Decision, _audit, _pks, _require_reason, _step_runs_load, _step_snapshot, step_run_records

KIND_DEAD = "dead"
KIND_NOT_DEAD = "not_dead"
KIND_DISCARDED = "discarded"
KIND_KEY_OPEN = "key_open"

MSG_DISCARD = "failed for good after {attempts} attempt(s): will be discarded (never retried; the input stays {input_status})"
MSG_ALREADY_DISCARDED = "already discarded"
MSG_NOT_DEAD = "not dead: the step is {status} (only failed steps can be discarded)"
MSG_KEY_OPEN = "its key is {status} (a retry is under way): not discarded"


def _decide_discard(step_run: StepRun, record: IdempotencyRecord | None) -> Decision:
    def decision(acts: bool, kind: str, reason: str) -> Decision:
        return Decision(target=step_run, target_type="step_run", acts=acts, kind=kind, reason=reason, record=record)

    if step_run.status == StepStatus.DISCARDED:
        return decision(False, KIND_DISCARDED, MSG_ALREADY_DISCARDED)
    if step_run.status != StepStatus.FAILED:
        return decision(False, KIND_NOT_DEAD, MSG_NOT_DEAD.format(status=step_run.get_status_display().lower()))
    if record is not None and record.status != RecordStatus.FAILED:
        # PROCESSING (an attempt holds it: a retry is under way) or COMPLETED: not dead.
        return decision(False, KIND_KEY_OPEN, MSG_KEY_OPEN.format(status=record.status))
    return decision(True, KIND_DEAD, MSG_DISCARD.format(attempts=step_run.attempts_used, input_status=step_run.input.get_status_display().lower()))


def step_runs_discard_plan(*, step_runs: Iterable[StepRun]) -> list[Decision]:
    """What discarding ``step_runs`` would do, one Decision per step run. Writes nothing."""
    loaded = _step_runs_load(step_runs)
    records = step_run_records(step_runs=loaded)
    return [_decide_discard(s, records.get(s.pk)) for s in loaded]


def step_runs_discard(
    *, step_runs: Iterable[StepRun], actor, reason: str, source: str, now: datetime | None = None,
    batch: uuid.UUID | None = None,
) -> ActionReport:
    """Give up on dead (FAILED) steps: each becomes DISCARDED, with one audit row in the
    transaction of its move; any other step is skipped with the reason. Callers check
    ``pipeline_ops.discard_steprun``. Raises ValueError for an empty reason or an unknown source."""
    reason = _require_reason(reason, source)
    now = now or db_now()
    report = ActionReport(action=OperatorAction.Action.DISCARD, verb="discarded", batch=batch or uuid.uuid4())
    for step_run_id in _pks(step_runs):
        with transaction.atomic():
            loaded = _step_runs_load([step_run_id], for_update=True)  # the step first, then its key
            if not loaded:
                continue
            step_run = loaded[0]
            record = step_run_records(step_runs=[step_run], for_update=True).get(step_run.pk)
            decision = _decide_discard(step_run, record)
            before = _step_snapshot(step_run, record)
            after = before
            if decision.acts:
                moved = StepRun.objects.filter(
                    pk=step_run.pk, status=StepStatus.FAILED, status__in=step_sources(StepStatus.DISCARDED)
                ).update(status=StepStatus.DISCARDED, next_attempt_at=None, updated_at=now)
                if not moved:  # cannot happen under the row lock; say so rather than audit a move that did not happen
                    decision = Decision(target=step_run, target_type="step_run", acts=False, kind=KIND_NOT_DEAD,
                                        reason=MSG_NOT_DEAD.format(status="changed"), record=record)
                else:
                    step_run.refresh_from_db()
                    after = _step_snapshot(step_run, record)
            _audit(batch=report.batch, actor=actor, source=source, action=OperatorAction.Action.DISCARD, reason=reason,
                   decision=decision, before=before, after=after, outcome=decision.acts)
        report.add(decision)
    return report
