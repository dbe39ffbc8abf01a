"""Retention purge (idempotency/purge.py) and its command ``idempotency_purge``: the key retention
(24 h: the key is forgotten, its stored result cleared) and the history retention (30 days: the
record and its attempts are deleted)."""
from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from idempotency import guard
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.purge import records_purge
from idempotency.states import RecordStatus

from .helpers import RETRYING, at, claim, claimed

pytestmark = pytest.mark.django_db

DAY = 24 * 3600
LATER = at(3 * DAY)  # past the 24 h key retention of everything created at at(0)
MUCH_LATER = at(33 * DAY)  # past the 30-day history retention too


def completed(key: str, *, now):
    attempt = claimed(key, now=now)
    guard.complete(attempt=attempt, result={"k": key}, now=now)


def failed_for_good(key: str, *, now):
    attempt = claimed(key, now=now)
    guard.fail(attempt=attempt, error=ValueError("bad"), now=now)


def keys() -> set[str]:
    """Keys whose record (history) is still there."""
    return set(IdempotencyRecord.objects.values_list("key", flat=True))


def remembered() -> set[str]:
    """Keys still remembered: their record is there and not forgotten."""
    return set(IdempotencyRecord.objects.filter(forgotten_at__isnull=True).values_list("key", flat=True))


def test_purge_keeps_live_processing_record_when_past_both_retentions():
    claimed("live", now=at(0), lease=40 * DAY)  # a very long job, still holding its lease at MUCH_LATER

    report = records_purge(now=MUCH_LATER)

    assert (report.forgotten, report.deleted, report.stuck) == (0, 0, 0)
    assert remembered() == {"live"}


def test_purge_reports_but_keeps_expired_processing_record_when_lease_ran_out():
    claimed("stuck", now=at(0))

    report = records_purge(now=MUCH_LATER)

    assert (report.forgotten, report.deleted) == (0, 0)
    assert report.stuck == 1
    assert report.stuck_examples[0].startswith("test/stuck (attempt #1, lease expired")
    assert remembered() == {"stuck"}


def test_purge_forgets_expired_finished_keys_but_keeps_their_attempts_when_past_key_retention():
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

    assert keys() == {"done", "dead", "retrying", "abandoned", "fresh"}  # the history stays
    assert Attempt.objects.count() == 5
    assert (report.forgotten, report.deleted) == (3, 0)
    assert remembered() == {"retrying", "fresh"}
    done = IdempotencyRecord.objects.get(key="done")
    assert done.result is None and done.forgotten_at == LATER and done.status == RecordStatus.COMPLETED
    assert Attempt.objects.get(record__key="dead").error_message == "bad"


def test_purge_deletes_finished_records_with_their_attempts_when_past_history_retention():
    completed("done", now=at(0))
    failed_for_good("dead", now=at(0))
    completed("recent", now=at(20 * DAY))  # forgotten at MUCH_LATER, but its history stays
    claimed("stuck", now=at(0))

    report = records_purge(now=MUCH_LATER)

    assert keys() == {"recent", "stuck"}
    assert set(Attempt.objects.values_list("record__key", flat=True)) == {"recent", "stuck"}
    assert (report.forgotten, report.deleted, report.stuck) == (1, 2, 1)
    assert remembered() == {"stuck"}


def test_purge_works_in_batches_when_batch_size_is_smaller_than_rows():
    for i in range(7):
        completed(f"k{i}", now=at(0))
    forgets, batches = [], []

    first = records_purge(now=LATER, batch_size=3, on_forget=forgets.append, on_batch=batches.append)
    then = records_purge(now=MUCH_LATER, batch_size=3, on_forget=forgets.append, on_batch=batches.append)

    assert forgets == [3, 3, 1] and batches == [3, 3, 1]
    assert (first.forgotten, first.forget_candidates, first.deleted, first.candidates) == (7, 7, 0, 0)
    assert (then.forgotten, then.forget_candidates, then.deleted, then.candidates) == (0, 0, 7, 7)
    assert IdempotencyRecord.objects.count() == 0 and Attempt.objects.count() == 0


def test_purge_stops_at_limit_when_limit_given():
    for i in range(5):
        completed(f"k{i}", now=at(0))

    report = records_purge(now=LATER, batch_size=2, limit=3)

    assert report.forgotten == 3
    assert len(remembered()) == 2 and IdempotencyRecord.objects.count() == 5


def test_purge_changes_nothing_when_dry_run():
    for i in range(4):
        completed(f"k{i}", now=at(0))
    completed("recent", now=at(20 * DAY))
    claimed("stuck", now=at(0))

    report = records_purge(now=MUCH_LATER, dry_run=True)

    assert (report.forgotten, report.forget_candidates, report.deleted, report.candidates, report.stuck) == (0, 1, 0, 4, 1)
    assert len(remembered()) == 6 and IdempotencyRecord.objects.filter(result__isnull=False).count() == 5


def test_purge_by_age_spares_processing_when_older_than_given():
    completed("old", now=at(0))
    claimed("old-running", now=at(0))

    report = records_purge(now=at(2 * 3600), older_than_hours=1, history_older_than_hours=1.5)

    assert (report.forgotten, report.deleted) == (0, 1)  # past both: deleted, not forgotten first
    assert keys() == {"old-running"}


@override_settings(IDEMPOTENCY={"RETENTION_HOURS": 48, "HISTORY_RETENTION_HOURS": 24})
def test_purge_refuses_to_run_when_history_retention_is_shorter_than_key_retention():
    from django.core.exceptions import ImproperlyConfigured

    completed("done", now=at(0))

    with pytest.raises(ImproperlyConfigured, match="HISTORY_RETENTION_HOURS .24. must be at least RETENTION_HOURS .48."):
        records_purge(now=MUCH_LATER)

    assert remembered() == {"done"}


# --- a key after its key retention ---------------------------------------------------------------


def test_key_runs_again_as_a_new_attempt_with_the_next_number_when_reused_after_key_retention(attempt_statuses):
    first = claimed("reused", now=at(0))
    guard.complete(attempt=first, result={"n": 1}, now=at(1))
    assert isinstance(claim("reused", now=at(60)), guard.Replay)  # remembered: replayed
    records_purge(now=LATER)

    # Same key after 24 h, even with another body: the key is new again (Stripe, the IETF draft).
    outcome = claim("reused", now=LATER, fp="another-body")

    assert isinstance(outcome, guard.Claimed) and outcome.attempt.number == 2
    assert attempt_statuses("reused") == {1: "SUCCEEDED", 2: "RUNNING"}  # the history stays linked
    record = IdempotencyRecord.objects.get(key="reused")
    assert (record.status, record.forgotten_at, record.fingerprint, record.replay_count) == (
        RecordStatus.PROCESSING, None, "another-body", 1,  # replays counted before stay counted
    )
    # The first life's attempt can never move the key again (fencing stays monotonic).
    assert guard.complete(attempt=first, result={"late": True}, now=LATER).fenced is True
    assert not guard.heartbeat(attempt=first, now=LATER)
    assert attempt_statuses("reused") == {1: "SUCCEEDED", 2: "RUNNING"}
    assert guard.complete(attempt=outcome.attempt, result={"n": 2}, now=LATER).fenced is False
    assert isinstance(claim("reused", now=LATER, fp="another-body"), guard.Replay)


def test_forgotten_failed_key_runs_again_when_claimed_after_key_retention(attempt_statuses):
    failed_for_good("dead", now=at(0))
    assert isinstance(claim("dead", now=at(60)), guard.Failed)
    records_purge(now=LATER)

    outcome = claim("dead", now=LATER)

    assert isinstance(outcome, guard.Claimed) and outcome.attempt.number == 2
    assert attempt_statuses("dead") == {1: "FAILED", 2: "RUNNING"}


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


def test_command_prints_json_summary_and_changes_nothing_when_dry_run():
    make_expired_rows(3)

    summary = json.loads(run_command("--dry-run", "--json", "--history-older-than", "24"))

    assert summary["dry_run"] is True
    assert (summary["forgotten"], summary["forget_candidates"], summary["deleted"], summary["candidates"], summary["stuck"]) == (0, 0, 0, 3, 1)
    assert IdempotencyRecord.objects.count() == 4 and len(remembered()) == 4


def test_command_forgets_in_batches_and_keeps_stuck_when_run_for_real():
    make_expired_rows(5)

    summary = json.loads(run_command("--batch-size", "2", "--json"))

    assert (summary["forgotten"], summary["deleted"], summary["stuck"]) == (5, 0, 1)
    assert remembered() == {"stuck"} and IdempotencyRecord.objects.count() == 6


def test_command_deletes_history_when_history_older_than_given():
    make_expired_rows(3)

    summary = json.loads(run_command("--history-older-than", "24", "--json"))

    assert (summary["forgotten"], summary["deleted"], summary["stuck"]) == (0, 3, 1)
    assert list(IdempotencyRecord.objects.values_list("status", flat=True)) == [RecordStatus.PROCESSING]


def test_command_prints_one_summary_line_when_not_json():
    make_expired_rows(2)

    text = run_command("--limit", "1")

    assert text.splitlines()[0] == (
        "idempotency_purge: forgot 1 key(s); deleted 0 record(s) with their attempts; 1 stuck (PROCESSING, lease expired) kept."
    )
    assert "stuck: test/stuck" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1."),
        (["--limit", "0"], "--limit must be at least 1."),
        (["--older-than", "-1"], "--older-than must be zero or more hours."),
        (["--history-older-than", "-1"], "--history-older-than must be zero or more hours."),
        (["--older-than", "48", "--history-older-than", "24"], "--history-older-than must be at least --older-than"),
        (["--batch-size", "many"], "invalid int value"),
    ],
)
def test_command_raises_command_error_when_argument_is_bad(args, message):
    make_expired_rows(1)

    with pytest.raises(CommandError, match=message):
        run_command(*args)

    assert remembered() == {"old0", "stuck"}


@override_settings(IDEMPOTENCY={"RETENTION_HOURS": 48, "HISTORY_RETENTION_HOURS": 24})
def test_command_raises_one_line_command_error_when_history_retention_is_shorter():
    make_expired_rows(1)

    with pytest.raises(CommandError, match="must be at least RETENTION_HOURS") as caught:
        run_command()

    assert "\n" not in str(caught.value) and remembered() == {"old0", "stuck"}


# --- the purge never deletes live work ----------------------------------------------------------
# Both retentions a day long here, so that each rule is proven for both stages at once: nothing
# live is forgotten, nothing live is deleted.

BOTH_A_DAY = override_settings(IDEMPOTENCY={"RETENTION_HOURS": 24, "HISTORY_RETENTION_HOURS": 24})


def purged(report) -> tuple[int, int]:
    return report.forgotten, report.deleted


@BOTH_A_DAY
def test_purge_keeps_key_released_by_an_operator_when_its_first_expiry_has_passed():
    stuck = claimed("released", now=at(0), lease=4 * DAY)  # expiry at(1 day), still PROCESSING
    record = IdempotencyRecord.objects.get(key="released")
    assert guard.release(record=record, reason="stuck on a dead host", now=at(2 * DAY))

    report = records_purge(now=at(2 * DAY + 3600))  # its retry is due: live work

    assert purged(report) == (0, 0) and remembered() == {"released"}
    assert Attempt.objects.get(pk=stuck.pk).status == "TIMED_OUT"  # the history is still there


@BOTH_A_DAY
def test_purge_keeps_key_reopened_by_an_operator_when_its_first_expiry_has_passed():
    failed_for_good("reopened", now=at(0))
    assert guard.reopen(record=IdempotencyRecord.objects.get(key="reopened"), now=at(2 * DAY))

    assert purged(records_purge(now=at(2 * DAY + 3600))) == (0, 0)
    assert remembered() == {"reopened"}


@BOTH_A_DAY
def test_purge_keeps_failure_history_a_retention_past_a_failure_late_in_a_long_lease():
    attempt = claimed("late_failure", now=at(0), lease=4 * DAY)
    guard.fail(attempt=attempt, error=ValueError("bad"), now=at(3 * DAY))  # terminal, three days in

    assert purged(records_purge(now=at(3 * DAY + 3600))) == (0, 0)
    assert purged(records_purge(now=at(4 * DAY + 60))) == (0, 1)  # a whole retention later it goes


@BOTH_A_DAY
def test_purge_older_than_zero_keeps_key_whose_retry_is_due():
    waiting = claimed("waiting", now=at(0))
    guard.fail(attempt=waiting, error=TimeoutError("t"), policy=RETRYING, now=at(1))  # retry at(11)
    completed("done", now=at(0))

    report = records_purge(now=at(3600), older_than_hours=0)

    assert report.forgotten == 1 and remembered() == {"waiting"}


@BOTH_A_DAY
def test_purge_keeps_key_dead_lettered_by_a_late_claim_when_its_first_expiry_has_passed():
    claimed("dead_lettered", now=at(0), lease=60, max_attempts=1)
    # Two days later a redelivery finds the lease long gone and the attempts used up: FAILED.
    assert isinstance(claim("dead_lettered", now=at(2 * DAY), max_attempts=1), guard.Failed)

    assert purged(records_purge(now=at(2 * DAY + 3600))) == (0, 0)
    assert purged(records_purge(now=at(3 * DAY + 60))) == (0, 1)  # a whole retention after it moved


def test_system_check_warns_when_history_retention_is_shorter_than_key_retention():
    from idempotency.checks import retention_check

    assert retention_check() == []
    with override_settings(IDEMPOTENCY={"RETENTION_HOURS": 48, "HISTORY_RETENTION_HOURS": 24}):
        [warning] = retention_check()
    assert warning.id == "idempotency.W001" and "must be at least RETENTION_HOURS (48)" in warning.msg
