"""RetryPolicy (idempotency/policy.py) and fingerprints (idempotency/fingerprint.py): no database."""
from __future__ import annotations

import random

import pytest

from idempotency.fingerprint import canonical_json, fingerprint
from idempotency.policy import NO_RETRY, RetryPolicy


class RateLimited(Exception):
    def __init__(self, retry_after_seconds):
        super().__init__("429")
        self.retry_after_seconds = retry_after_seconds


def transient(exc: BaseException) -> bool:
    return isinstance(exc, (TimeoutError, RateLimited))


POLICY = RetryPolicy(max_attempts=10, backoff_base_seconds=2, backoff_max_seconds=60, jitter=False, is_transient=transient)


def test_backoff_doubles_then_caps_when_attempts_grow():
    delays = [POLICY.backoff_seconds(n) for n in range(1, 9)]

    assert delays == [2, 4, 8, 16, 32, 60, 60, 60]


@pytest.mark.parametrize("attempt_number", [1, 3, 5, 12])
def test_jitter_stays_between_half_and_full_ceiling_when_enabled(attempt_number):
    policy = RetryPolicy(max_attempts=20, backoff_base_seconds=2, backoff_max_seconds=60, jitter=True, is_transient=transient)
    ceiling = POLICY.backoff_seconds(attempt_number)
    rng = random.Random(1234)

    samples = [policy.backoff_seconds(attempt_number, rng=rng) for _ in range(500)]

    assert all(ceiling / 2 <= s <= ceiling for s in samples)
    assert max(samples) - min(samples) > ceiling / 4  # it really jitters


def test_retry_delay_is_none_when_error_not_transient():
    assert POLICY.retry_delay(attempt_number=1, error=ValueError("bad input")) is None


def test_retry_delay_is_none_when_max_attempts_reached():
    assert POLICY.retry_delay(attempt_number=9, error=TimeoutError()) == 60
    assert POLICY.retry_delay(attempt_number=10, error=TimeoutError()) is None
    assert NO_RETRY.retry_delay(attempt_number=1, error=None) is None


def test_retry_delay_honours_retry_after_hint_when_longer_than_backoff():
    assert POLICY.retry_delay(attempt_number=1, error=RateLimited(45)) == 45
    assert POLICY.retry_delay(attempt_number=6, error=RateLimited(5)) == 60  # never shorter than backoff


def test_policy_refuses_construction_when_max_attempts_below_one():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_fingerprint_is_independent_of_key_order_when_dicts_are_equal():
    a = {"amount": 5, "items": [{"sku": "x", "qty": 1}], "meta": {"b": 2, "a": 1}}
    b = {"meta": {"a": 1, "b": 2}, "items": [{"qty": 1, "sku": "x"}], "amount": 5}

    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64
    assert canonical_json(b) == '{"amount":5,"items":[{"qty":1,"sku":"x"}],"meta":{"a":1,"b":2}}'


def test_fingerprint_differs_when_value_or_list_order_differs():
    assert fingerprint({"amount": 5}) != fingerprint({"amount": 6})
    assert fingerprint([1, 2]) != fingerprint([2, 1])
    assert fingerprint({"amount": 5}) != fingerprint({"amount": "5"})
