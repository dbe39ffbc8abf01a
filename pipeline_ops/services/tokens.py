"""API tokens: issued once, stored hashed (``models.ApiToken``)."""
from __future__ import annotations

import hashlib
import secrets

from ..models import ApiToken

TOKEN_BYTES = 20  # 160 bits, as DRF's authtoken: 40 hex characters


def api_token_digest(*, token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def api_token_create(*, user) -> tuple[ApiToken, str]:
    """Issue a new token for ``user``; returns the stored row and the token, which is not kept
    anywhere: show it to its owner once."""
    token = secrets.token_hex(TOKEN_BYTES)
    row = ApiToken.objects.create(user=user, digest=api_token_digest(token=token), prefix=token[:8])
    return row, token


def api_token_user(*, token: str):
    """The active user a token belongs to, or None."""
    row = ApiToken.objects.select_related("user").filter(digest=api_token_digest(token=token)).first()
    return row.user if row is not None else None
