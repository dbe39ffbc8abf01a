"""Idempotency-Key support for Django REST framework views (IETF draft-ietf-httpapi-idempotency-key-header,
Stripe semantics), and one problem+json (RFC 9457) exception handler for every API error.

Use it on any DRF view, with the mixin::

    class ChargeCreateApi(IdempotencyMixin, APIView):
        def post(self, request):
            data = ChargeSerializer(data=request.data)
            data.is_valid(raise_exception=True)        # validate FIRST: a 400 stores nothing
            return self.idempotent_response(
                request, perform=lambda: Response(charge_create(**data.validated_data), status=201))

or with the decorator, where the whole handler is the guarded work::

    class RefundApi(APIView):
        @idempotent_endpoint()
        def post(self, request): ...

``perform`` runs inside the transaction that completes the key, so its database writes and the
stored response commit together or not at all. What a client sees:

====================================================  ===========================================
missing / malformed ``Idempotency-Key``               400 ``idempotency_key_missing`` / ``_malformed``
first request                                         the handler's response (stored if < 400)
same key and request, first completed                 the stored response + ``Idempotent-Replayed: true``
same key, first still running                         409 ``idempotency_key_in_progress`` + ``Retry-After``;
                                                      with ``Prefer: wait=N`` waits up to N s (capped by
                                                      ``IDEMPOTENCY["MAX_WAIT_SECONDS"]``), then replays
same key, other method/path/body                      422 ``idempotency_key_reused``
handler raised or answered >= 400                     nothing stored, key free for an immediate retry
====================================================  ===========================================

This module must never import ``pipeline_ops``: other apps' domain errors derive from
``idempotency.errors.CodedError`` (``status_code`` and ``code``), which the handler renders.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.db import transaction
from django.http import Http404, HttpResponse
from django.utils import timezone
from rest_framework import exceptions as drf_exceptions
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from . import conf, guard
from .errors import (
    AttemptFencedError, CodedError, KeyFailedError, KeyInProgressError, KeyMalformedError, KeyMissingError, KeyReusedError,
    preference_applied_wait,
)
from .fingerprint import fingerprint
from .heartbeat import Heartbeat
from .models import IdempotencyRecord
from .policy import RetryPolicy
from .states import RecordStatus

logger = logging.getLogger(__name__)

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
PROBLEM_CONTENT_TYPE = "application/problem+json"
MAX_KEY_LENGTH = 255  # the column's size (IdempotencyRecord.key)

# A failed first request must leave the key usable at once (nothing replayable was stored):
# every error is "transient" and the retry is due immediately.
RETRY_AT_ONCE = RetryPolicy(max_attempts=2**31 - 1, backoff_base_seconds=0.0, jitter=False, is_transient=lambda exc: True)

# RFC 8941 sf-string: DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE, printable ASCII only.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_ESCAPE = re.compile(r'\\(["\\])')
_BARE_KEY = re.compile(r"[\x20-\x7e]+")


# --- header parsing ---------------------------------------------------------------------------


def parse_idempotency_key(raw: str | None) -> str:
    """The key carried by an ``Idempotency-Key`` header value.

    Accepts the RFC 8941 string form the IETF draft specifies (``"abc"``, with ``\\"`` and
    ``\\\\`` escapes) and, like Stripe, a bare value. Raises KeyMissingError (no header) and
    KeyMalformedError (empty, over 255 characters, non-printable or non-ASCII, bad quoting).
    """
    if raw is None:
        raise KeyMissingError()
    value = raw.strip(" \t")
    if value.startswith('"'):
        match = _SF_STRING.fullmatch(value)
        if match is None:
            raise KeyMalformedError(
                'The quoted Idempotency-Key is not a valid RFC 8941 string (printable ASCII, only \\" and \\\\ escapes).'
            )
        value = _SF_ESCAPE.sub(r"\1", match.group(1))
    elif value and not _BARE_KEY.fullmatch(value):
        raise KeyMalformedError("The Idempotency-Key header may contain only printable ASCII characters.")
    if not value.strip():
        raise KeyMalformedError("The Idempotency-Key header is empty.")
    if len(value) > MAX_KEY_LENGTH:
        raise KeyMalformedError(f"The Idempotency-Key header is longer than {MAX_KEY_LENGTH} characters.")
    return value


def parse_prefer_wait(raw: str | None, *, cap: float | None = None) -> float:
    """Seconds asked for by ``Prefer: wait=N`` (RFC 7240 section 4.3), capped; 0 when absent or invalid.

    An unparsable preference is ignored, as RFC 7240 asks of preferences a server does not understand.
    """
    cap = conf.get("MAX_WAIT_SECONDS") if cap is None else cap
    if not raw:
        return 0.0
    for preference in raw.split(","):
        token = preference.split(";", 1)[0].strip()
        name, _, value = token.partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if value.isdigit():
            return float(min(int(value), cap))
    return 0.0


def request_fingerprint(*, method: str, path: str, body: Any) -> str:
    """SHA-256 of method + path + the canonical JSON of the parsed body (key order and whitespace
    do not matter; values do)."""
    if hasattr(body, "lists"):  # a QueryDict from a form post: keep repeated fields
        body = {name: values for name, values in body.lists()}
    return fingerprint({"method": method.upper(), "path": path, "body": body})


# --- stored responses -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    """A response as kept in ``IdempotencyRecord.result``: the exact body text, so a replay sends
    the same bytes as the first response (jsonb would reorder a parsed body's keys)."""

    status: int
    body: str
    headers: dict[str, str]

    def as_result(self) -> dict:
        return {"status": self.status, "body": self.body, "headers": self.headers}

    @classmethod
    def from_result(cls, result: dict) -> StoredResponse:
        return cls(status=int(result["status"]), body=result["body"], headers=dict(result.get("headers") or {}))

    @classmethod
    def from_response(cls, response: HttpResponse) -> StoredResponse:
        if isinstance(response, Response):
            body = JSONRenderer().render(response.data).decode("utf-8")
            content_type = "application/json"
        else:
            body = response.content.decode("utf-8")
            content_type = response.get("Content-Type", "application/json")
        headers = {"Content-Type": content_type}
        for name, value in response.items():
            if name.lower() not in {"content-type", "content-length", "vary", "allow"}:
                headers[name] = value
        return cls(status=response.status_code, body=body, headers=headers)

    def to_response(self, *, replayed: bool) -> HttpResponse:
        response = HttpResponse(self.body.encode("utf-8"), status=self.status)
        for name, value in self.headers.items():
            response[name] = value
        if replayed:
            response[REPLAYED_HEADER] = "true"
        return response


class _Fenced(Exception):
    """This attempt lost the key before it could complete."""


class _NotKept(Exception):
    """The handler answered with an error: roll its writes back and store nothing."""

    def __init__(self, response: HttpResponse):
        super().__init__(f"the handler answered {response.status_code}; nothing stored")
        self.response = response


# --- the guarded call ---------------------------------------------------------------------------


def idempotent_call(
    *,
    scope: str,
    key: str,
    operation: str,
    fingerprint: str,
    perform: Callable[[], HttpResponse],
    wait_seconds: float = 0.0,
    lease_seconds: float | None = None,
    on_claimed: Callable[[Any], None] | None = None,
) -> HttpResponse:
    """Run ``perform`` at most once in effect for ``(scope, key)`` and answer as the contract says.

    ``on_claimed(attempt)`` runs after the key was claimed and before the work's transaction
    opens (work that need not be in the transaction, or a test's pause).

    While the claimed request runs, a heartbeat (``idempotency.heartbeat``) extends its lease, so
    a request longer than its lease is not taken over by its own retry, and on PostgreSQL holds
    its liveness lock, so a request whose process died is taken over by the next retry at once.

    Raises KeyInProgressError (409), KeyReusedError (422), KeyFailedError (409), or whatever
    ``perform`` raises (after failing the attempt so the key may be retried at once).
    """
    deadline = time.monotonic() + max(0.0, wait_seconds)
    waited = False
    while True:
        # In autocommit: a new key is one statement and its own commit, seen in flight at once.
        outcome = guard.claim(scope=scope, key=key, operation=operation, fingerprint=fingerprint, lease_seconds=lease_seconds)
        match outcome:
            case guard.Claimed(attempt=attempt):
                response = _run(attempt, perform, on_claimed, lease_seconds=lease_seconds)
                break
            case guard.Replay():
                response = StoredResponse.from_result(outcome.result).to_response(replayed=True)
                break
            case guard.InFlight(record=record, until=until):
                if time.monotonic() < deadline:
                    waited = True
                    _wait_for_change(record, deadline=deadline)
                    continue
                raise KeyInProgressError(
                    until=until, retry_after=outcome.retry_after_seconds(),
                    waited_seconds=int(wait_seconds) if waited else None,
                )
            case guard.Mismatch():
                raise KeyReusedError()
            case guard.Failed(record=record):
                raise KeyFailedError(detail={"error": record.error_summary})
    if waited:
        response["Preference-Applied"] = preference_applied_wait(wait_seconds)
    return response


def _run(
    attempt, perform: Callable[[], HttpResponse], on_claimed: Callable[[Any], None] | None = None, *,
    lease_seconds: float | None = None,
) -> HttpResponse:
    """Run the claimed request under its heartbeat. The heartbeat spans the completion and the
    failure too: the liveness lock may go only once the key's fate has committed (before that, a
    retry must see this request as alive), and a completion slowed down by the database must not
    lose the key to a takeover meanwhile."""
    with Heartbeat(attempt=attempt, lease_seconds=lease_seconds):
        return _run_held(attempt, perform, on_claimed)


def _run_held(attempt, perform: Callable[[], HttpResponse], on_claimed: Callable[[Any], None] | None = None) -> HttpResponse:
    # One transaction holds the work's writes and the completion of the key (guard.complete's
    # own atomic block becomes a savepoint in it): the response to store describes what the
    # work created (its id, its Location), so it is known only after the work ran.
    try:
        if on_claimed is not None:
            on_claimed(attempt)
        with transaction.atomic():
            stored = StoredResponse.from_response(perform())
            if stored.status >= 400:
                raise _NotKept(stored.to_response(replayed=False))
            if guard.complete(attempt=attempt, result=stored.as_result()).fenced:
                raise _Fenced  # roll our writes back: a newer attempt owns the key
    except _Fenced:
        # Our writes are gone, and so is the FENCED mark complete() made inside our transaction.
        # A key once lost is never regained (attempt_count only grows), so completing again now
        # can only be refused: it records this attempt as FENCED for good and returns the
        # winner's stored response, if any. The check is belt and braces for that invariant.
        if IdempotencyRecord.objects.filter(pk=attempt.record_id, status=RecordStatus.PROCESSING, attempt_count=attempt.number).exists():
            guard.fail(attempt=attempt, error=AttemptFencedError(), policy=RETRY_AT_ONCE)
            raise KeyInProgressError("This request lost its Idempotency-Key to a newer one; retry.") from None
        completion = guard.complete(attempt=attempt, result=None)
        if completion.fenced and completion.result:
            return StoredResponse.from_result(completion.result).to_response(replayed=True)
        raise KeyInProgressError("A newer attempt took over this Idempotency-Key; retry to get its response.") from None
    except _NotKept as refused:
        guard.fail(attempt=attempt, error=refused, policy=RETRY_AT_ONCE)
        return refused.response
    except Exception as exc:
        guard.fail(attempt=attempt, error=exc, policy=RETRY_AT_ONCE)
        raise
    return stored.to_response(replayed=False)


def _wait_for_change(record: IdempotencyRecord, *, deadline: float) -> None:
    """Poll the record (cheap reads, no locks) until it leaves the state we saw, its lease
    passes, or ``deadline``; the caller then claims again and gets the new outcome."""
    seen = (record.status, record.attempt_count)
    lease_end = record.lease_expires_at or record.retry_at
    delay = 0.02
    while time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.25)
        row = IdempotencyRecord.objects.filter(pk=record.pk).values("status", "attempt_count").first()
        if row is None or (row["status"], row["attempt_count"]) != seen:
            return
        if lease_end is not None and lease_end <= timezone.now():
            return


# --- the view API ---------------------------------------------------------------------------


def default_scope(request) -> str:
    """Keys belong to the authenticated client: the same key value from two clients never meets."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        raise drf_exceptions.NotAuthenticated()
    return f"api:{user.pk}"


class IdempotencyMixin:
    """Gives a DRF view ``idempotent_response(request, perform=...)``. Override the ``get_idempotency_*``
    methods to change the scope (default: per authenticated user) or the operation name."""

    idempotency_lease_seconds: float | None = None

    def get_idempotency_scope(self, request) -> str:
        return default_scope(request)

    def get_idempotency_operation(self, request) -> str:
        return f"{request.method} {request.path}"

    def get_idempotency_fingerprint(self, request) -> str:
        return request_fingerprint(method=request.method, path=request.path, body=request.data)

    def idempotency_claimed(self, request, attempt) -> None:
        """Called once the key is claimed, before the work's transaction opens. No-op by default."""

    def idempotent_response(self, request, *, perform: Callable[[], HttpResponse]) -> HttpResponse:
        """Parse the key, then run ``perform`` under the guard (see the module doc for the answers)."""
        key = parse_idempotency_key(request.headers.get(KEY_HEADER))
        return idempotent_call(
            scope=self.get_idempotency_scope(request),
            key=key,
            operation=self.get_idempotency_operation(request),
            fingerprint=self.get_idempotency_fingerprint(request),
            perform=perform,
            wait_seconds=parse_prefer_wait(request.headers.get("Prefer")),
            lease_seconds=self.idempotency_lease_seconds,
            on_claimed=lambda attempt: self.idempotency_claimed(request, attempt),
        )


def idempotent_endpoint(*, scope: Callable[[Any], str] = default_scope, lease_seconds: float | None = None):
    """Decorator for a DRF view method (or ``@api_view`` function): the whole handler becomes the
    guarded work. Validation errors raised inside it store nothing and leave the key free, but a
    record of the failed attempt remains; validate before the guard (the mixin) to avoid even that."""

    def decorate(handler):
        @wraps(handler)
        def wrapper(*args, **kwargs):
            request = args[1] if len(args) > 1 and hasattr(args[1], "headers") else args[0]
            key = parse_idempotency_key(request.headers.get(KEY_HEADER))
            return idempotent_call(
                scope=scope(request),
                key=key,
                operation=f"{request.method} {request.path}",
                fingerprint=request_fingerprint(method=request.method, path=request.path, body=request.data),
                perform=lambda: handler(*args, **kwargs),
                wait_seconds=parse_prefer_wait(request.headers.get("Prefer")),
                lease_seconds=lease_seconds,
            )

        return wrapper

    return decorate


# --- problem+json (RFC 9457) ----------------------------------------------------------------------

_DRF_CODES: list[tuple[type[Exception], str, str]] = [
    (drf_exceptions.ValidationError, "validation_error", "The request is not valid."),
    (drf_exceptions.ParseError, "parse_error", "The request body could not be parsed."),
    (drf_exceptions.NotAuthenticated, "not_authenticated", "Authentication is required."),
    (drf_exceptions.AuthenticationFailed, "authentication_failed", "The credentials were not accepted."),
    (drf_exceptions.PermissionDenied, "permission_denied", "You may not do this."),
    (drf_exceptions.NotFound, "not_found", "Not found."),
    (drf_exceptions.MethodNotAllowed, "method_not_allowed", "Method not allowed."),
    (drf_exceptions.NotAcceptable, "not_acceptable", "The requested representation is not available."),
    (drf_exceptions.UnsupportedMediaType, "unsupported_media_type", "Unsupported media type."),
    (drf_exceptions.Throttled, "throttled", "Too many requests."),
]


def problem_type(code: str) -> str:
    """A distinct, stable type URI per code (a URN: nothing to dereference offline)."""
    return f"urn:problem-type:{code}"


def problem_response(*, status: int, code: str, title: str, detail: str, headers: dict | None = None, **extra: Any) -> HttpResponse:
    """An ``application/problem+json`` response with ``type``, ``title``, ``status``, ``detail`` and ``code``."""
    body = {"type": problem_type(code), "title": title, "status": status, "detail": detail, "code": code, **extra}
    response = HttpResponse(JSONRenderer().render(body), status=status, content_type=PROBLEM_CONTENT_TYPE)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _flatten_errors(detail: Any, path: str = "") -> list[dict]:
    """DRF's nested error dict/list as a flat list of ``{"field", "code", "message"}``."""
    if isinstance(detail, dict):
        return [item for name, sub in detail.items() for item in _flatten_errors(sub, f"{path}.{name}" if path else str(name))]
    if isinstance(detail, list):
        if all(isinstance(d, drf_exceptions.ErrorDetail) or isinstance(d, str) for d in detail):
            return [{"field": path or "non_field_errors", "code": getattr(d, "code", "invalid"), "message": str(d)} for d in detail]
        return [item for i, sub in enumerate(detail) for item in _flatten_errors(sub, f"{path}[{i}]")]
    return [{"field": path or "non_field_errors", "code": getattr(detail, "code", "invalid"), "message": str(detail)}]


def problem_exception_handler(exc: Exception, context: dict) -> HttpResponse:
    """DRF ``EXCEPTION_HANDLER``: every error as problem+json with a stable ``code``.

    Handles ``CodedError`` (this app's errors and other apps' domain errors derived from it), DRF's,
    Django's 404/403/too-big, and anything else as a logged 500.
    """
    headers: dict[str, str] = {}
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    if isinstance(exc, RequestDataTooBig):
        return problem_response(status=413, code="payload_too_large", title="Payload too large", detail=str(exc))
    if isinstance(exc, CodedError):
        headers.update(exc.response_headers())
        return problem_response(
            status=exc.status_code, code=exc.code, title=exc.default_message, detail=exc.message,
            headers=headers, **({"errors": exc.detail} if exc.detail else {}),
        )
    if isinstance(exc, drf_exceptions.APIException):
        code, title = _api_code(exc)
        if isinstance(exc, drf_exceptions.Throttled) and exc.wait is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.wait)))
        view = context.get("view")
        if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)) and view is not None:
            www = view.get_authenticate_header(context["request"]) if hasattr(view, "get_authenticate_header") else None
            if www:
                headers["WWW-Authenticate"] = www
        if isinstance(exc, drf_exceptions.ValidationError):
            errors = _flatten_errors(exc.detail)
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or title
            return problem_response(status=exc.status_code, code=code, title=title, detail=detail, headers=headers, errors=errors)
        return problem_response(status=exc.status_code, code=code, title=title, detail=str(exc.detail), headers=headers)
    logger.exception("Unhandled error in %s", context.get("view").__class__.__name__ if context.get("view") else "an API view", exc_info=exc)
    return problem_response(status=500, code="server_error", title="Internal server error", detail="The server failed to process the request; nothing was stored for its Idempotency-Key, so it may be retried.")


def _api_code(exc: drf_exceptions.APIException) -> tuple[str, str]:
    for cls, code, title in _DRF_CODES:
        if isinstance(exc, cls):
            return code, title
    return str(getattr(exc, "default_code", "error")), "Error"
