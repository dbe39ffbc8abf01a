"""Property-based test of the purge's two stages against live work: random interleavings of
claims, failures (terminal and with a retry), completions, releases, reopens, lease takeovers,
hours passing and purges, on one key, with a key retention of a day and a history retention of
three.

The oracle is the test's own bookkeeping, not the record's ``expires_at``: the test notes when
the key last *moved* (a claim or takeover, a dead-letter, a failure, a completion, a release, a
reopen) and, at every purge, predicts from that alone whether the key may be forgotten (key
retention) and whether its record may be deleted with its attempts (history retention):

* never while PROCESSING (running, or stuck for a person to see);
* never within a whole retention period of its last move;
* never while a retry is pending, unless it fell due a whole retention period ago;
* otherwise it must be forgotten / deleted (the purge is not simply switched off).

And across a forgotten key: the history stays (every attempt started since the record was
created is still there) and the next claim runs with the next number (fencing stays monotonic).
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from idempotency import guard
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.purge import records_purge
from idempotency.states import RecordStatus

from .helpers import RETRYING, at, claim

pytestmark = pytest.mark.django_db

KEY = "purge-prop"
LEASE = 600
MAX_ATTEMPTS = 3
HOUR = 3600
RETENTIONS = {"RETENTION_HOURS": 24, "HISTORY_RETENTION_HOURS": 72}

operation = st.one_of(
    st.tuples(st.just("claim")), st.tuples(st.just("claim")),
    st.tuples(st.just("fail"), st.booleans()),  # transient (a retry) or terminal
    st.tuples(st.just("complete")),
    st.tuples(st.just("release")),
    st.tuples(st.just("reopen")),
    # Long waits are what retention is about: weighted so that most examples cross a day.
    st.tuples(st.just("advance"), st.sampled_from([60, HOUR, 23 * HOUR, 24 * HOUR, 25 * HOUR, 49 * HOUR])),
    st.tuples(st.just("advance"), st.sampled_from([23 * HOUR, 25 * HOUR, 49 * HOUR, 73 * HOUR])),
    st.tuples(st.just("purge")), st.tuples(st.just("purge")),
)


def record() -> IdempotencyRecord | None:
    return IdempotencyRecord.objects.filter(scope="test", key=KEY).first()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation, min_size=1, max_size=25))
# The interleavings that once lost live work, always tried first: a release, a reopen, a
# terminal failure and a dead-letter more than a day after the key's first expiry, then a purge.
@example(ops=[("claim",), ("advance", 25 * HOUR), ("release",), ("purge",)])
@example(ops=[("claim",), ("fail", False), ("advance", 25 * HOUR), ("reopen",), ("purge",)])
@example(ops=[("claim",), ("advance", 25 * HOUR), ("fail", False), ("purge",)])
@example(ops=[("claim",), ("fail", True), ("purge",), ("advance", 49 * HOUR), ("purge",)])
@example(ops=[("claim",), ("advance", 25 * HOUR), ("claim",), ("advance", 25 * HOUR), ("claim",),
              ("advance", 25 * HOUR), ("claim",), ("purge",)])  # dead-lettered after three takeovers
@example(ops=[("claim",), ("complete",), ("advance", 25 * HOUR), ("purge",), ("claim",), ("fail", False),
              ("advance", 73 * HOUR), ("purge",)])  # forgotten, claimed again (#2), then the history goes
def test_purge_never_deletes_live_work_when_moves_and_purges_interleave(ops):
    with override_settings(IDEMPOTENCY=RETENTIONS):
        _run(ops)


def _run(ops):
    IdempotencyRecord.objects.all().delete()
    key_retention = timedelta(hours=RETENTIONS["RETENTION_HOURS"])
    history_retention = timedelta(hours=RETENTIONS["HISTORY_RETENTION_HOURS"])
    t = 0
    last_move = None
    started = 0  # attempts started since the record was created: its history
    holder = None  # the attempt that holds the key, as far as the test knows
    for op in ops:
        now = at(t)
        before = record()
        kind = op[0]
        if kind == "advance":
            t += op[1]
        elif kind == "claim":
            outcome = claim(KEY, now=now, lease=LEASE, max_attempts=MAX_ATTEMPTS)
            if before is not None and before.forgotten_at is not None:
                assert isinstance(outcome, guard.Claimed), f"a forgotten key must run again, got {outcome}"
            if isinstance(outcome, guard.Claimed):
                started += 1
                assert outcome.attempt.number == started, "attempt numbers go on across a forgotten key"
                holder, last_move = outcome.attempt, now
            elif isinstance(outcome, guard.Failed) and before.status == RecordStatus.PROCESSING:
                holder, last_move = None, now  # the lease ran out max_attempts times: dead-lettered
        elif kind == "fail" and holder is not None:
            error = TimeoutError("slow") if op[1] else ValueError("bad")
            if guard.fail(attempt=holder, error=error, policy=RETRYING, now=now).held:
                last_move = now
            holder = None
        elif kind == "complete" and holder is not None:
            if not guard.complete(attempt=holder, result={"t": t}, now=now).fenced:
                last_move = now
            holder = None
        elif kind == "release" and before is not None:
            if guard.release(record=before, reason="prop", now=now):
                holder, last_move = None, now
        elif kind == "reopen" and before is not None:
            if guard.reopen(record=before, now=now):
                last_move = now
        elif kind == "purge":
            records_purge(now=now)
            after = record()
            if before is None:
                continue

            def past(retention):
                return (
                    before.status != RecordStatus.PROCESSING
                    and last_move < now - retention
                    and (before.retry_at is None or before.retry_at < now - retention)
                )

            may_forget, may_delete = past(key_retention), past(history_retention)
            event(f"purge of a {before.status} key -> "
                  f"{'deleted' if after is None else 'forgotten' if after.forgotten_at else 'kept'}")
            assert (after is None) == may_delete, (
                f"{before.status} key, last move {last_move}, retry at {before.retry_at}, purged at {now}: "
                f"{'deleted' if after is None else 'kept'}"
            )
            if after is None:
                holder, last_move, started = None, None, 0  # the history went: the next claim starts afresh
                continue
            assert (after.forgotten_at is not None) == (before.forgotten_at is not None or may_forget), (
                f"{before.status} key, last move {last_move}, retry at {before.retry_at}, purged at {now}: "
                f"{'forgotten' if after.forgotten_at else 'remembered'}"
            )
            if after.forgotten_at is not None:
                assert after.result is None
            assert Attempt.objects.filter(record=after).count() == started, "the history stays with the forgotten key"
        t += 1  # every operation takes a second: no two moves share an instant
