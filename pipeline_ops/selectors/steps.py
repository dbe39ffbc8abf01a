"""Reads that connect the guard's rows (records, attempts) back to pipeline step runs."""
from __future__ import annotations

import uuid
from collections.abc import Iterable

from django.db.models import Q, QuerySet

from idempotency.models import IdempotencyRecord

from ..models import StepRun

STEP_SCOPE = "step"


def step_run_key_parse(*, key: str) -> tuple[uuid.UUID, str] | None:
    """``"<input id>:<step>"`` (a step key in the 'step' scope) -> (input id, step), else None."""
    input_id, sep, step = key.partition(":")
    if not sep or not step:
        return None
    try:
        return uuid.UUID(input_id), step
    except ValueError:
        return None


def step_runs_for_records(*, record_ids: Iterable[int]) -> QuerySet[StepRun]:
    """The step runs whose guard records are ``record_ids``: by the runner's link, or, for steps
    claimed before the link was written, by their key in the step scope (three queries)."""
    record_ids = list(record_ids)
    condition = Q(idempotency_record_id__in=record_ids)
    linked = set(StepRun.objects.filter(condition).values_list("idempotency_record_id", flat=True))
    unlinked = [pk for pk in record_ids if pk not in linked]
    for key in IdempotencyRecord.objects.filter(pk__in=unlinked, scope=STEP_SCOPE).values_list("key", flat=True):
        parsed = step_run_key_parse(key=key)
        if parsed is not None:
            condition |= Q(input_id=parsed[0], step=parsed[1])
    return StepRun.objects.filter(condition)
