"""Token authentication against hashed tokens (``models.ApiToken``): the header is DRF's
(``Authorization: Token <token>``), the lookup is by the token's SHA-256."""
from __future__ import annotations

from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication

from ..services.tokens import api_token_user


class HashedTokenAuthentication(TokenAuthentication):
    keyword = "Token"

    def authenticate_credentials(self, key):
        user = api_token_user(token=key)
        if user is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        return (user, None)
