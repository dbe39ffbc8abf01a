"""The one validator of a submission's payload, used by the API (``api.serializers.PayloadField``)
and the ``submit`` command (``services.submissions``), so a line the API refuses is refused by the
command too, with the same code and message."""
from __future__ import annotations

from typing import Any

from ..errors import InvalidPayloadError


class PayloadValidationError(InvalidPayloadError):
    """A payload the pipelines cannot work on. ``code`` says which rule (stable, e.g. ``text_required``)."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.code = code


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value: a scalar is 0, ``{"a": 1}`` is 1 (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            deepest = max(deepest, depth + 1)
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
            deepest = max(deepest, depth + 1)
    return deepest


def _has_nul(value: Any) -> bool:
    # PostgreSQL's jsonb cannot store U+0000: refuse it as a client error, not a server crash.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def input_payload_validate(*, payload: Any) -> dict:
    """Return ``payload`` if a pipeline can work on it: a JSON object with a non-empty ``text``
    string of at most ``MAX_TEXT_CHARS`` characters, nested at most ``MAX_JSON_DEPTH`` levels,
    without NUL characters (the API's limits, ``PIPELINE_OPS_API``).

    Raises PayloadValidationError with ``code`` ``not_an_object``, ``text_required``,
    ``text_too_long``, ``too_deep`` or ``null_character``.
    """
    from ..api import conf  # the limits are the API's settings (read lazily: override_settings works)

    if not isinstance(payload, dict):
        raise PayloadValidationError("The payload must be a JSON object.", code="not_an_object")
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        raise PayloadValidationError("The payload needs a non-empty 'text' string.", code="text_required")
    limit = conf.get("MAX_TEXT_CHARS")
    if len(text) > limit:
        raise PayloadValidationError(f"The payload's text has {len(text)} characters; at most {limit} are accepted.", code="text_too_long")
    max_depth = conf.get("MAX_JSON_DEPTH")
    if json_depth(payload) > max_depth:
        raise PayloadValidationError(f"The payload is nested deeper than {max_depth} levels.", code="too_deep")
    if _has_nul(payload):
        raise PayloadValidationError("The payload may not contain NUL (U+0000) characters.", code="null_character")
    return payload
