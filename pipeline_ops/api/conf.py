"""The API's settings: one namespaced dict, ``settings.PIPELINE_OPS_API``, read on every access
(so ``override_settings`` works in tests)."""
from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Largest request body accepted, in bytes (413 payload_too_large above it).
    "MAX_BODY_BYTES": 256 * 1024,
    # Longest payload "text", in characters (the steps work on it; 400 above it).
    "MAX_TEXT_CHARS": 20_000,
    # Deepest nesting of the payload's JSON (objects and arrays), 400 above it.
    "MAX_JSON_DEPTH": 8,
    # Per-client rate (DRF syntax "N/second|minute|hour|day"); counters live in the Django cache.
    "THROTTLE_RATE": "600/minute",
    # Inputs per page of GET /api/v1/inputs/ (cursor pagination), and the most a client may ask for.
    "PAGE_SIZE": 50,
    "MAX_PAGE_SIZE": 200,
}


def get(name: str) -> Any:
    if name not in DEFAULTS:
        raise KeyError(f"Unknown PIPELINE_OPS_API setting {name!r}")
    return getattr(settings, "PIPELINE_OPS_API", {}).get(name, DEFAULTS[name])
