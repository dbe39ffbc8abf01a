"""Fingerprints: SHA-256 of a canonical JSON form, so equal requests hash equally."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no insignificant whitespace; the form that gets hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)


def fingerprint(value: Any) -> str:
    """SHA-256 hex digest of ``value``'s canonical JSON (64 characters)."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
