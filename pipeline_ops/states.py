"""Pipeline statuses and the moves allowed between them (the one place they are declared)."""
from __future__ import annotations

from django.db import models


class InputStatus(models.TextChoices):
    PENDING = "PENDING", "Pending"
    RUNNING = "RUNNING", "Running"
    SUCCEEDED = "SUCCEEDED", "Succeeded"
    FAILED = "FAILED", "Failed"
    CANCELLED = "CANCELLED", "Cancelled"


class StepStatus(models.TextChoices):
    PENDING = "PENDING", "Pending (earlier steps not done)"
    QUEUED = "QUEUED", "Queued"
    RUNNING = "RUNNING", "Running"
    RETRY_WAIT = "RETRY_WAIT", "Waiting to retry"
    SUCCEEDED = "SUCCEEDED", "Succeeded"
    FAILED = "FAILED", "Failed"
    CANCELLED = "CANCELLED", "Cancelled"
    # An operator gave up on a FAILED step (services.discard): it leaves the Dead page and is
    # never retried. Not CANCELLED, which means the input was stopped before it could fail, and
    # not FAILED, which the Dead page lists: the audit row says who gave up and why.
    DISCARDED = "DISCARDED", "Discarded by an operator"


INPUT_TERMINAL = frozenset({InputStatus.SUCCEEDED, InputStatus.FAILED, InputStatus.CANCELLED})
STEP_TERMINAL = frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.DISCARDED})

STEP_TRANSITIONS: dict[str, frozenset[str]] = {
    StepStatus.PENDING: frozenset({StepStatus.QUEUED, StepStatus.CANCELLED}),
    StepStatus.QUEUED: frozenset({StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.QUEUED, StepStatus.FAILED, StepStatus.CANCELLED}),
    StepStatus.RUNNING: frozenset(
        {StepStatus.SUCCEEDED, StepStatus.RETRY_WAIT, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.QUEUED, StepStatus.RUNNING}
    ),
    StepStatus.RETRY_WAIT: frozenset({StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.CANCELLED}),
    # An operator's retry re-queues a failed step (RETRY_WAIT when a bulk retry is spread out
    # at PIPELINE_OPS_RETRY_RATE); nothing leaves SUCCEEDED or CANCELLED.
    StepStatus.FAILED: frozenset({StepStatus.QUEUED, StepStatus.RETRY_WAIT, StepStatus.DISCARDED}),
    StepStatus.SUCCEEDED: frozenset(),
    StepStatus.CANCELLED: frozenset(),
    StepStatus.DISCARDED: frozenset(),
}


def step_sources(target: str) -> list[str]:
    """Step statuses from which ``target`` may be reached (for conditional UPDATEs)."""
    return [source for source, targets in STEP_TRANSITIONS.items() if target in targets]
