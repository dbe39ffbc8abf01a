"""The app's settings: one namespaced dict, ``settings.IDEMPOTENCY``, read on every access.

Reading lazily (not at import) is what lets ``override_settings(IDEMPOTENCY=...)`` work in tests.
"""
from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # How long a claim holds a key before another attempt may take it over. Long enough for a
    # typical unit of work; longer work heartbeats.
    "LEASE_SECONDS": 30,
    # How long records are kept for replay before the purge may delete them (Stripe: 24 h).
    "RETENTION_HOURS": 24,
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
