"""Errors of the API layer, each with its HTTP meaning and a stable ``code``."""
from __future__ import annotations

from ..errors import PipelineOpsError


class PayloadTooLargeError(PipelineOpsError):
    status_code = 413
    code = "payload_too_large"
    default_message = "The request body is too large."


class LengthRequiredError(PipelineOpsError):
    status_code = 411
    code = "length_required"
    default_message = "This server cannot read a chunked request body: send Content-Length."


class InputNotFoundError(PipelineOpsError):
    status_code = 404
    code = "not_found"
    default_message = "No input with this id exists (or it belongs to another client)."
