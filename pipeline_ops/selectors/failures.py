"""Failed step runs, filtered the way an operator narrows an incident (``retry_failed``)."""
from __future__ import annotations

from datetime import datetime

from django.db.models import OuterRef, QuerySet, Subquery

from idempotency.models import Attempt

from ..models import StepRun
from ..states import StepStatus


def step_runs_list_failed(
    *,
    pipeline: str | None = None,
    step: str | None = None,
    error_type: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> QuerySet[StepRun]:
    """FAILED step runs, oldest failure first, optionally narrowed to a pipeline, a step name, the
    exception class of their last attempt (``error_type``, e.g. ``ReadTimeout``), and failures at
    or after ``since``. Each row is annotated with ``last_error_type``."""
    last_error_type = (
        Attempt.objects.filter(record_id=OuterRef("idempotency_record_id")).order_by("-number").values("error_type")[:1]
    )
    query = (
        StepRun.objects.filter(status=StepStatus.FAILED)
        .select_related("input")
        .annotate(last_error_type=Subquery(last_error_type))
        .order_by("finished_at", "pk")
    )
    if pipeline:
        query = query.filter(input__pipeline=pipeline)
    if step:
        query = query.filter(step=step)
    if error_type:
        query = query.filter(last_error_type=error_type)
    if since is not None:
        query = query.filter(finished_at__gte=since)
    if limit is not None:
        query = query[:limit]
    return query
