"""Per-client throttling: one bucket per authenticated user (429 with Retry-After)."""
from __future__ import annotations

from rest_framework.throttling import UserRateThrottle

from . import conf


class ApiClientRateThrottle(UserRateThrottle):
    scope = "api_client"

    def get_rate(self) -> str:
        # Read per request, not at import like DRF's THROTTLE_RATES, so the setting can change.
        return conf.get("THROTTLE_RATE")
