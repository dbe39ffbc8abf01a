"""Domain errors of pipeline-ops, each with its HTTP meaning and a stable ``code``, in one place."""
from __future__ import annotations

from idempotency.errors import CodedError


class PipelineOpsError(CodedError):
    code = "pipeline_ops_error"


class UnknownPipelineError(PipelineOpsError):
    status_code = 400
    code = "unknown_pipeline"
    default_message = "No pipeline of that name is declared."


class InvalidPayloadError(PipelineOpsError):
    status_code = 400
    code = "invalid_payload"
    default_message = "The payload is not valid for this pipeline."
