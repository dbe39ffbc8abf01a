"""Statuses and the moves allowed between them: the one place state transitions are declared.

Every move in ``guard`` is a conditional UPDATE whose WHERE clause names the "from" states below,
so a move the table does not allow cannot happen even under a race.
"""
from __future__ import annotations

from django.db import models


class RecordStatus(models.TextChoices):
    PROCESSING = "PROCESSING", "Processing"
    COMPLETED = "COMPLETED", "Completed"
    FAILED = "FAILED", "Failed"


class AttemptStatus(models.TextChoices):
    RUNNING = "RUNNING", "Running"
    SUCCEEDED = "SUCCEEDED", "Succeeded"
    FAILED = "FAILED", "Failed"
    # The external call timed out: it may have happened. Not the same as failed.
    UNKNOWN = "UNKNOWN", "Unknown outcome"
    # Its lease expired (or an operator forced a retry) and a newer attempt took the key over.
    TIMED_OUT = "TIMED_OUT", "Timed out (superseded)"
    # It finished after losing the key: its write was refused and rolled back.
    FENCED = "FENCED", "Fenced (late write refused)"


RECORD_TRANSITIONS: dict[str, frozenset[str]] = {
    RecordStatus.PROCESSING: frozenset({RecordStatus.COMPLETED, RecordStatus.FAILED, RecordStatus.PROCESSING}),
    # FAILED -> PROCESSING is a retry (automatic after backoff, or an operator's).
    RecordStatus.FAILED: frozenset({RecordStatus.PROCESSING}),
    RecordStatus.COMPLETED: frozenset(),
}

ATTEMPT_TRANSITIONS: dict[str, frozenset[str]] = {
    AttemptStatus.RUNNING: frozenset(
        {
            AttemptStatus.SUCCEEDED,
            AttemptStatus.FAILED,
            AttemptStatus.UNKNOWN,
            AttemptStatus.TIMED_OUT,
            AttemptStatus.FENCED,
        }
    ),
    # A superseded attempt may still record how it ended, on its own row only.
    AttemptStatus.TIMED_OUT: frozenset({AttemptStatus.FAILED, AttemptStatus.UNKNOWN, AttemptStatus.FENCED}),
    # The incident: an attempt given up as UNKNOWN finishes late and tries to write.
    AttemptStatus.UNKNOWN: frozenset({AttemptStatus.FENCED}),
    AttemptStatus.SUCCEEDED: frozenset(),
    AttemptStatus.FAILED: frozenset(),
    AttemptStatus.FENCED: frozenset(),
}

ATTEMPT_FINAL = frozenset({AttemptStatus.SUCCEEDED, AttemptStatus.FAILED, AttemptStatus.FENCED})


def attempt_sources(target: str) -> list[str]:
    """The attempt statuses from which ``target`` may be reached (for conditional UPDATEs)."""
    return [source for source, targets in ATTEMPT_TRANSITIONS.items() if target in targets]


def record_can_move(source: str, target: str) -> bool:
    return target in RECORD_TRANSITIONS[source]
