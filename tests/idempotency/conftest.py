"""Fixtures for the guard's tests."""
from __future__ import annotations

import pytest

from idempotency.models import Attempt, IdempotencyRecord


@pytest.fixture
def record_of():
    """Fresh copy of the record for ``key`` from the database (never a cached instance)."""

    def get(key: str = "k", scope: str = "test") -> IdempotencyRecord:
        return IdempotencyRecord.objects.get(scope=scope, key=key)

    return get


@pytest.fixture
def attempt_statuses():
    """``{number: status}`` of every attempt at ``key``, read from the database."""

    def get(key: str = "k", scope: str = "test") -> dict[int, str]:
        return dict(
            Attempt.objects.filter(record__scope=scope, record__key=key).order_by("number").values_list("number", "status")
        )

    return get
