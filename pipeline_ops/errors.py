"""Domain errors of pipeline-ops, each with its HTTP meaning and a stable ``code``, in one place."""
from __future__ import annotations


class PipelineOpsError(Exception):
    status_code = 400
    code = "pipeline_ops_error"
    default_message = "The request could not be processed."

    def __init__(self, message: str | None = None, *, detail: dict | None = None):
        self.message = message or self.default_message
        self.detail = detail or {}
        super().__init__(self.message)


class UnknownPipelineError(PipelineOpsError):
    status_code = 400
    code = "unknown_pipeline"
    default_message = "No pipeline of that name is declared."


class InvalidPayloadError(PipelineOpsError):
    status_code = 400
    code = "invalid_payload"
    default_message = "The payload is not valid for this pipeline."
