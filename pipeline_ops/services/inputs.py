"""Services for pipeline inputs: submission (more to come: cancellation, status roll-up)."""
from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from ..models import PipelineInput, StepRun
from ..pipelines import pipeline_get
from ..queueing import step_run_enqueue
from ..states import StepStatus


@dataclass(frozen=True)
class SubmitResult:
    input: PipelineInput
    created: bool


def input_submit(
    *,
    pipeline: str,
    payload: dict,
    scope: str,
    key: str = "",
    submitted_by: AbstractBaseUser | None = None,
) -> SubmitResult:
    """Create the input, its step runs and the first step's task in one transaction.

    With a ``key``, a second submission in the same ``scope`` returns the existing input with
    ``created=False`` (the unique constraint decides, not a prior lookup).
    Raises UnknownPipelineError.
    """
    spec = pipeline_get(name=pipeline)
    now = timezone.now()
    try:
        with transaction.atomic():
            pipeline_input = PipelineInput.objects.create(
                pipeline=spec.name, payload=payload, submission_scope=scope, idempotency_key=key,
                submitted_by=submitted_by,
            )
            steps = StepRun.objects.bulk_create(
                [
                    StepRun(
                        input=pipeline_input, step=name, position=position,
                        status=StepStatus.QUEUED if position == 0 else StepStatus.PENDING,
                        enqueued_at=now if position == 0 else None,
                    )
                    for position, name in enumerate(spec.steps)
                ]
            )
            first = steps[0] if steps[0].pk else StepRun.objects.get(input=pipeline_input, position=0)
            step_run_enqueue(step_run_id=first.pk)
    except IntegrityError:
        if not key:
            raise
        existing = PipelineInput.objects.get(submission_scope=scope, idempotency_key=key)
        return SubmitResult(input=existing, created=False)
    return SubmitResult(input=pipeline_input, created=True)
