"""Real-cluster tests: real ``qcluster`` subprocesses on the *test* database, the real model server,
real SIGKILLs. The clusters are stopped inside each test (the chaos run's ``finally``) before
pytest-django flushes or drops the database."""
from __future__ import annotations

import pytest
import redis
from django.conf import settings


@pytest.fixture
def redis_available() -> None:
    # Not a skip: CI starts Redis (.ci/run), and a silently skipped broker would prove nothing.
    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:  # pragma: no cover - environment problem, reported loudly
        pytest.fail(f"Redis at {settings.REDIS_URL} is unreachable: {exc}")
