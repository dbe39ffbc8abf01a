"""Property-based test of the purge against live work: random interleavings of claims, failures
(terminal and with a retry), completions, releases, reopens, lease takeovers, hours passing and
purges, on one key.

The oracle is the test's own bookkeeping, not the record's ``expires_at``: the test notes when
the key last *moved* (a claim or takeover, a dead-letter, a failure, a completion, a release, a
reopen) and, at every purge, predicts from that alone whether the key may go:

* never while PROCESSING (running, or stuck for a person to see);
* never within a whole retention period of its last move;
* never while a retry is pending, unless it fell due a whole retention period ago;
* otherwise it must go (the purge is not simply switched off).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from idempotency import guard
from idempotency.models import IdempotencyRecord
from idempotency.purge import records_purge
from idempotency.states import RecordStatus

from .helpers import RETRYING, at, claim

pytestmark = pytest.mark.django_db

KEY = "purge-prop"
LEASE = 600
MAX_ATTEMPTS = 3
HOUR = 3600

operation = st.one_of(
    st.tuples(st.just("claim")), st.tuples(st.just("claim")),
    st.tuples(st.just("fail"), st.booleans()),  # transient (a retry) or terminal
    st.tuples(st.just("complete")),
    st.tuples(st.just("release")),
    st.tuples(st.just("reopen")),
    # Long waits are what retention is about: weighted so that most examples cross a day.
    st.tuples(st.just("advance"), st.sampled_from([60, HOUR, 23 * HOUR, 24 * HOUR, 25 * HOUR, 49 * HOUR])),
    st.tuples(st.just("advance"), st.sampled_from([23 * HOUR, 25 * HOUR, 49 * HOUR])),
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
def test_purge_never_deletes_live_work_when_moves_and_purges_interleave(ops):
    IdempotencyRecord.objects.all().delete()
    retention = guard._retention()
    t = 0
    last_move = None
    holder = None  # the attempt that holds the key, as far as the test knows
    for op in ops:
        now = at(t)
        before = record()
        kind = op[0]
        if kind == "advance":
            t += op[1]
        elif kind == "claim":
            outcome = claim(KEY, now=now, lease=LEASE, max_attempts=MAX_ATTEMPTS)
            if isinstance(outcome, guard.Claimed):
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
            may_go = (
                before.status != RecordStatus.PROCESSING
                and last_move < now - retention
                and (before.retry_at is None or before.retry_at < now - retention)
            )
            event(f"purge of a {before.status} key -> {'gone' if after is None else 'kept'}")
            assert (after is None) == may_go, (
                f"{before.status} key, last move {last_move}, retry at {before.retry_at}, purged at {now}: "
                f"{'deleted' if after is None else 'kept'}"
            )
            if after is None:
                holder, last_move = None, None  # the key is forgotten: the next claim starts afresh
        t += 1  # every operation takes a second: no two moves share an instant
