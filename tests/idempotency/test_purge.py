"""Retention purge (idempotency/purge.py) and its command ``idempotency_purge``."""
from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from idempotency import guard
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.purge import records_purge
from idempotency.states import RecordStatus

from .helpers import RETRYING, at, claimed

pytestmark = pytest.mark.django_db

DAY = 24 * 3600
LATER = at(3 * DAY)  # past the 24 h retention of everything created at at(0)


def completed(key: str, *, now):
    attempt = claimed(key, now=now)
    guard.complete(attempt=attempt, result={"k": key}, now=now)


def failed_for_good(key: str, *, now):
    attempt = claimed(key, now=now)
    guard.fail(attempt=attempt, error=ValueError("bad"), now=now)


def keys() -> set[str]:
    return set(IdempotencyRecord.objects.values_list("key", flat=True))


def test_purge_keeps_live_processing_record_when_past_retention():
    claimed("live", now=at(0), lease=4 * DAY)  # a very long job, still holding its lease at LATER

    report = records_purge(now=LATER)

    assert report.deleted == 0 and report.stuck == 0
    assert keys() == {"live"}


def test_purge_reports_but_keeps_expired_processing_record_when_lease_ran_out():
    claimed("stuck", now=at(0))

    report = records_purge(now=LATER)

    assert report.deleted == 0
    assert report.stuck == 1
    assert report.stuck_examples[0].startswith("test/stuck (attempt #1, lease expired")
    assert keys() == {"stuck"}


def test_purge_deletes_expired_finished_records_with_their_attempts_when_past_retention():
    completed("done", now=at(0))
    failed_for_good("dead", now=at(0))
    retrying = claimed("retrying", now=at(0))
    # Its retry falls due within retention of LATER: the key is still in use, whatever its age.
    guard.fail(attempt=retrying, error=TimeoutError("t"), policy=RETRYING, now=at(2 * DAY + 3600))
    abandoned = claimed("abandoned", now=at(0))
    # Its retry fell due on day 0 and nobody came back for it within a whole retention period.
    guard.fail(attempt=abandoned, error=TimeoutError("t"), policy=RETRYING, now=at(1))
    completed("fresh", now=at(3 * DAY - 60))  # completed a minute before LATER: within retention

    report = records_purge(now=LATER)

    assert report.deleted == 3
    assert keys() == {"retrying", "fresh"}
    assert set(Attempt.objects.values_list("record__key", flat=True)) == {"retrying", "fresh"}
    assert Attempt.objects.count() == 2


def test_purge_works_in_batches_when_batch_size_is_smaller_than_rows():
    for i in range(7):
        completed(f"k{i}", now=at(0))
    batches = []

    report = records_purge(now=LATER, batch_size=3, on_batch=batches.append)

    assert batches == [3, 3, 1]
    assert report.deleted == 7 and report.candidates == 7
    assert IdempotencyRecord.objects.count() == 0 and Attempt.objects.count() == 0


def test_purge_stops_at_limit_when_limit_given():
    for i in range(5):
        completed(f"k{i}", now=at(0))

    report = records_purge(now=LATER, batch_size=2, limit=3)

    assert report.deleted == 3
    assert IdempotencyRecord.objects.count() == 2


def test_purge_deletes_nothing_when_dry_run():
    for i in range(4):
        completed(f"k{i}", now=at(0))
    claimed("stuck", now=at(0))

    report = records_purge(now=LATER, dry_run=True)

    assert (report.deleted, report.candidates, report.stuck) == (0, 4, 1)
    assert IdempotencyRecord.objects.count() == 5


def test_purge_by_age_spares_processing_when_older_than_given():
    completed("old", now=at(0))
    claimed("old-running", now=at(0))

    report = records_purge(now=at(2 * 3600), older_than_hours=1)

    assert report.deleted == 1
    assert keys() == {"old-running"}


# --- the command ---------------------------------------------------------------------------------


def make_expired_rows(count: int):
    """Rows that the real clock sees as expired: completed two days ago."""
    two_days_ago = timezone.now() - timedelta(days=2)
    for i in range(count):
        completed(f"old{i}", now=two_days_ago)
    claimed("stuck", now=two_days_ago)


def run_command(*args) -> str:
    out = StringIO()
    call_command("idempotency_purge", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_command_prints_json_summary_and_deletes_nothing_when_dry_run():
    make_expired_rows(3)

    summary = json.loads(run_command("--dry-run", "--json"))

    assert summary["dry_run"] is True
    assert (summary["deleted"], summary["candidates"], summary["stuck"]) == (0, 3, 1)
    assert IdempotencyRecord.objects.count() == 4


def test_command_deletes_in_batches_and_keeps_stuck_when_run_for_real():
    make_expired_rows(5)

    summary = json.loads(run_command("--batch-size", "2", "--json"))

    assert (summary["deleted"], summary["stuck"]) == (5, 1)
    assert list(IdempotencyRecord.objects.values_list("status", flat=True)) == [RecordStatus.PROCESSING]


def test_command_prints_one_summary_line_when_not_json():
    make_expired_rows(2)

    text = run_command("--limit", "1")

    assert text.splitlines()[0] == "idempotency_purge: deleted 1 record(s); 1 stuck (PROCESSING, lease expired) kept."
    assert "stuck: test/stuck" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1."),
        (["--limit", "0"], "--limit must be at least 1."),
        (["--older-than", "-1"], "--older-than must be zero or more hours."),
        (["--batch-size", "many"], "invalid int value"),
    ],
)
def test_command_raises_command_error_when_argument_is_bad(args, message):
    make_expired_rows(1)

    with pytest.raises(CommandError, match=message):
        run_command(*args)

    assert IdempotencyRecord.objects.count() == 2


# --- the purge never deletes live work ----------------------------------------------------------


def test_purge_keeps_key_released_by_an_operator_when_its_first_expiry_has_passed():
    stuck = claimed("released", now=at(0), lease=4 * DAY)  # expiry at(1 day), still PROCESSING
    record = IdempotencyRecord.objects.get(key="released")
    assert guard.release(record=record, reason="stuck on a dead host", now=at(2 * DAY))

    report = records_purge(now=at(2 * DAY + 3600))  # its retry is due: live work

    assert report.deleted == 0 and keys() == {"released"}
    assert Attempt.objects.get(pk=stuck.pk).status == "TIMED_OUT"  # the history is still there


def test_purge_keeps_key_reopened_by_an_operator_when_its_first_expiry_has_passed():
    failed_for_good("reopened", now=at(0))
    assert guard.reopen(record=IdempotencyRecord.objects.get(key="reopened"), now=at(2 * DAY))

    assert records_purge(now=at(2 * DAY + 3600)).deleted == 0
    assert keys() == {"reopened"}


def test_purge_keeps_failure_history_a_retention_past_a_failure_late_in_a_long_lease():
    attempt = claimed("late_failure", now=at(0), lease=4 * DAY)
    guard.fail(attempt=attempt, error=ValueError("bad"), now=at(3 * DAY))  # terminal, three days in

    assert records_purge(now=at(3 * DAY + 3600)).deleted == 0
    assert records_purge(now=at(4 * DAY + 60)).deleted == 1  # a whole retention later it goes


def test_purge_older_than_zero_keeps_key_whose_retry_is_due():
    waiting = claimed("waiting", now=at(0))
    guard.fail(attempt=waiting, error=TimeoutError("t"), policy=RETRYING, now=at(1))  # retry at(11)
    completed("done", now=at(0))

    report = records_purge(now=at(3600), older_than_hours=0)

    assert report.deleted == 1 and keys() == {"waiting"}


def test_purge_keeps_key_dead_lettered_by_a_late_claim_when_its_first_expiry_has_passed():
    from .helpers import claim

    claimed("dead_lettered", now=at(0), lease=60, max_attempts=1)
    # Two days later a redelivery finds the lease long gone and the attempts used up: FAILED.
    assert isinstance(claim("dead_lettered", now=at(2 * DAY), max_attempts=1), guard.Failed)

    assert records_purge(now=at(2 * DAY + 3600)).deleted == 0
    assert records_purge(now=at(3 * DAY + 60)).deleted == 1  # a whole retention after it moved
