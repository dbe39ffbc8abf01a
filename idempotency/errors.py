"""Errors of the idempotency app, each with its HTTP meaning and a stable ``code``, in one place.

The DRF integration renders any of them as problem+json; other callers may simply catch them.
"""
from __future__ import annotations

from datetime import datetime


class CodedError(Exception):
    """An error with an HTTP meaning (``status_code``) and a stable ``code``.

    ``idempotency.drf.problem_exception_handler`` renders any subclass as problem+json: other
    apps derive their domain errors from it rather than re-implementing the shape.
    """

    status_code = 400
    code = "error"
    default_message = "The request could not be processed."

    def __init__(self, message: str | None = None, *, detail: dict | None = None):
        self.message = message or self.default_message
        self.detail = detail or {}
        super().__init__(self.message)

    def response_headers(self) -> dict[str, str]:
        """Headers the HTTP answer to this error carries (e.g. ``Retry-After``)."""
        return {}


def preference_applied_wait(seconds: float) -> str:
    """The ``Preference-Applied`` value for a honoured ``Prefer: wait`` (RFC 7240)."""
    return f"wait={int(seconds)}"


class IdempotencyError(CodedError):
    status_code = 400
    code = "idempotency_error"
    default_message = "The idempotency key could not be used."


class KeyMissingError(IdempotencyError):
    status_code = 400
    code = "idempotency_key_missing"
    default_message = "This request needs an Idempotency-Key header."


class KeyMalformedError(IdempotencyError):
    status_code = 400
    code = "idempotency_key_malformed"
    default_message = "The Idempotency-Key header must be 1-255 printable ASCII characters."


class KeyInProgressError(IdempotencyError):
    """Another attempt holds the key (or its retry is not due yet); come back at ``until``."""

    status_code = 409
    code = "idempotency_key_in_progress"
    default_message = "A request with this Idempotency-Key is still being processed; retry later."

    def __init__(
        self, message: str | None = None, *, until: datetime | None = None, retry_after: int = 1,
        waited_seconds: int | None = None, detail: dict | None = None,
    ):
        self.until = until
        self.retry_after = max(1, int(retry_after))
        # Set when the request asked ``Prefer: wait=N`` and was held that long (capped) first.
        self.waited_seconds = waited_seconds
        super().__init__(message, detail=detail)

    def response_headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after)}
        if self.waited_seconds is not None:
            # The wait was honoured (as capped), and the first was still running when it ran out.
            headers["Preference-Applied"] = preference_applied_wait(self.waited_seconds)
        return headers


class KeyReusedError(IdempotencyError):
    """The key was used before for another operation or another request body."""

    status_code = 422
    code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was already used with a different request."


class KeyFailedError(IdempotencyError):
    """The key's work failed for good; an operator retry (or a new key) is needed."""

    status_code = 409
    code = "idempotency_key_failed"
    default_message = "The work for this Idempotency-Key failed permanently; use a new key."


class AttemptFencedError(IdempotencyError):
    """This attempt no longer holds its key: stop working, nothing it writes will be kept."""

    status_code = 409
    code = "attempt_fenced"
    default_message = "This attempt was superseded by a newer one; its work is discarded."
