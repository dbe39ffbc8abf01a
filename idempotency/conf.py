"""The app's settings: one namespaced dict, ``settings.IDEMPOTENCY``, read on every access.

Reading lazily (not at import) is what lets ``override_settings(IDEMPOTENCY=...)`` work in tests.
"""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DEFAULTS: dict[str, Any] = {
    # How long a claim holds a key before another attempt may take it over. Long enough for a
    # typical unit of work; longer work heartbeats.
    "LEASE_SECONDS": 30,
    # The key retention: how long a finished key is remembered for replay (Stripe: 24 h). After
    # it the purge forgets the key (clears its stored result): the same key then runs again.
    "RETENTION_HOURS": 24,
    # The history retention: how long the record and its attempts (errors, tracebacks) stay for
    # operators after the key's last move. Never shorter than the key retention.
    "HISTORY_RETENTION_HOURS": 720,
    # Dotted path to a function returning a queryset of record ids the project still shows as
    # history (e.g. the records its own rows point to); the history stage leaves them until
    # those rows go. None: keep nothing beyond the history retention.
    "HISTORY_KEEP": None,
    # Rows deleted per purge transaction: short transactions keep SQLite's single writer free.
    "PURGE_BATCH_SIZE": 1000,
    # Upper bound on ``Prefer: wait=N`` (RFC 7240) for a request whose key is in flight: the
    # waiting request holds a web worker, so a client must not be able to park it for long.
    "MAX_WAIT_SECONDS": 10,
    # A running attempt holds a PostgreSQL session advisory lock for its whole duration, so a
    # claimer sees at once that its holder died (idempotency.liveness) instead of waiting out the
    # lease. Turn it off (False) behind a transaction pooler (PgBouncer in transaction mode):
    # there a session lock outlives or skips the session it was taken for. The lease is the
    # fallback either way, and on other databases the lock is never taken.
    "LIVENESS_LOCKS": True,
}


def get(name: str) -> Any:
    if name not in DEFAULTS:
        raise KeyError(f"Unknown IDEMPOTENCY setting {name!r}")
    return getattr(settings, "IDEMPOTENCY", {}).get(name, DEFAULTS[name])


def retention_hours() -> tuple[float, float]:
    """``(key retention, history retention)`` in hours, checked: both positive, and the history
    at least as long as the key (attempts must outlive their key). Raises ImproperlyConfigured."""
    key, history = get("RETENTION_HOURS"), get("HISTORY_RETENTION_HOURS")
    if not key or key <= 0 or not history or history <= 0:
        raise ImproperlyConfigured(
            f"IDEMPOTENCY RETENTION_HOURS ({key}) and HISTORY_RETENTION_HOURS ({history}) must be positive."
        )
    if history < key:
        raise ImproperlyConfigured(
            f"IDEMPOTENCY HISTORY_RETENTION_HOURS ({history}) must be at least RETENTION_HOURS ({key}): "
            "the history (attempts, errors) must outlive the key."
        )
    return key, history
