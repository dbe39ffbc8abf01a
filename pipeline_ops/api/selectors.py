"""Reads for the API: which inputs a client may see, and an input with its steps, outputs and attempts."""
from __future__ import annotations

from collections import Counter
from datetime import datetime

from django.db.models import Prefetch, QuerySet

from idempotency.models import Attempt
from idempotency.states import AttemptStatus

from ..models import PipelineInput, StepRun
from .permissions import can_see_all_inputs

_ERROR_STATUSES = {AttemptStatus.FAILED, AttemptStatus.UNKNOWN, AttemptStatus.FENCED, AttemptStatus.TIMED_OUT}


def input_list_visible(
    *,
    user,
    status: str | None = None,
    pipeline: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> QuerySet[PipelineInput]:
    """Inputs ``user`` may see (operators: all; a client: its own), filtered, with their steps."""
    inputs = PipelineInput.objects.all() if can_see_all_inputs(user) else PipelineInput.objects.filter(submitted_by=user)
    if status:
        inputs = inputs.filter(status=status)
    if pipeline:
        inputs = inputs.filter(pipeline=pipeline)
    if created_after:
        inputs = inputs.filter(created_at__gte=created_after)
    if created_before:
        inputs = inputs.filter(created_at__lt=created_before)
    return inputs.prefetch_related(Prefetch("steps", queryset=StepRun.objects.order_by("position")))


def input_get_visible(*, user, input_id) -> PipelineInput | None:
    """The input if ``user`` may see it, else None (a client cannot tell another's input exists)."""
    return input_list_visible(user=user).filter(pk=input_id).first()


def input_detail(*, pipeline_input: PipelineInput) -> dict:
    """The input with each step's output and attempts, an attempt summary and the errors."""
    steps = list(StepRun.objects.filter(input=pipeline_input).select_related("output").order_by("position"))
    record_ids = [s.idempotency_record_id for s in steps if s.idempotency_record_id]
    attempts_by_record: dict[int, list[Attempt]] = {}
    for attempt in Attempt.objects.filter(record_id__in=record_ids).order_by("record_id", "number"):
        attempts_by_record.setdefault(attempt.record_id, []).append(attempt)
    counts: Counter = Counter()
    errors = []
    step_rows = []
    for step in steps:
        attempts = attempts_by_record.get(step.idempotency_record_id, [])
        counts.update(a.status for a in attempts)
        for a in attempts:
            if a.status in _ERROR_STATUSES and (a.error_type or a.error_message):
                errors.append({
                    "step": step.step, "attempt": a.number, "status": a.status, "error_type": a.error_type,
                    "error_message": a.error_message, "at": a.finished_at,
                })
        output = getattr(step, "output", None) if hasattr(step, "output") else None
        step_rows.append({
            "step": step.step, "position": step.position, "status": step.status, "attempts_used": step.attempts_used,
            "next_attempt_at": step.next_attempt_at, "started_at": step.started_at, "finished_at": step.finished_at,
            "last_error": step.last_error, "output": output.output if output is not None else None,
            "attempts": [
                {"number": a.number, "status": a.status, "started_at": a.started_at, "finished_at": a.finished_at,
                 "error_type": a.error_type, "error_message": a.error_message}
                for a in attempts
            ],
        })
    return {
        "id": pipeline_input.pk, "pipeline": pipeline_input.pipeline, "status": pipeline_input.status,
        "payload": pipeline_input.payload, "idempotency_key": pipeline_input.idempotency_key,
        "created_at": pipeline_input.created_at, "updated_at": pipeline_input.updated_at,
        "finished_at": pipeline_input.finished_at, "steps": step_rows,
        "attempt_summary": {"total": sum(counts.values()), "by_status": dict(counts)},
        "errors": errors,
    }
