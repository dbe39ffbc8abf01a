"""The state tables (idempotency/states.py): unit tests, no database."""
from __future__ import annotations

import pytest

from idempotency.states import (
    ATTEMPT_FINAL,
    ATTEMPT_TRANSITIONS,
    RECORD_TRANSITIONS,
    AttemptStatus,
    RecordStatus,
    attempt_sources,
    record_can_move,
)


def test_every_status_has_a_row_when_tables_are_declared():
    assert set(RECORD_TRANSITIONS) == set(RecordStatus.values)
    assert set(ATTEMPT_TRANSITIONS) == set(AttemptStatus.values)
    for targets in [*RECORD_TRANSITIONS.values(), *ATTEMPT_TRANSITIONS.values()]:
        assert targets <= set(RecordStatus.values) | set(AttemptStatus.values)


@pytest.mark.parametrize("target", RecordStatus.values)
def test_nothing_leaves_completed_record_when_any_move_is_tried(target):
    assert record_can_move(RecordStatus.COMPLETED, target) is False


def test_failed_record_may_only_be_retried_when_moving_on():
    assert RECORD_TRANSITIONS[RecordStatus.FAILED] == {RecordStatus.PROCESSING}
    assert record_can_move(RecordStatus.PROCESSING, RecordStatus.COMPLETED)
    assert not record_can_move(RecordStatus.FAILED, RecordStatus.COMPLETED)


@pytest.mark.parametrize("final", sorted(ATTEMPT_FINAL))
def test_nothing_leaves_final_attempt_when_any_move_is_tried(final):
    assert ATTEMPT_TRANSITIONS[final] == frozenset()
    assert all(final not in attempt_sources(target) for target in AttemptStatus.values)


def test_unknown_attempt_may_only_be_fenced_when_it_finishes_late():
    assert ATTEMPT_TRANSITIONS[AttemptStatus.UNKNOWN] == {AttemptStatus.FENCED}
    assert AttemptStatus.UNKNOWN in attempt_sources(AttemptStatus.FENCED)
    assert AttemptStatus.UNKNOWN not in attempt_sources(AttemptStatus.SUCCEEDED)


def test_superseded_attempt_may_record_its_ending_but_never_succeed_when_timed_out():
    assert ATTEMPT_TRANSITIONS[AttemptStatus.TIMED_OUT] == {
        AttemptStatus.FAILED, AttemptStatus.UNKNOWN, AttemptStatus.FENCED,
    }
    assert attempt_sources(AttemptStatus.SUCCEEDED) == [AttemptStatus.RUNNING]


def test_sources_match_table_when_computed_for_each_target():
    for target in AttemptStatus.values:
        expected = {s for s, targets in ATTEMPT_TRANSITIONS.items() if target in targets}
        assert set(attempt_sources(target)) == expected
    assert set(attempt_sources(AttemptStatus.FENCED)) == {
        AttemptStatus.RUNNING, AttemptStatus.TIMED_OUT, AttemptStatus.UNKNOWN,
    }
