"""Request validation and response shapes of the API (the OpenAPI schema is generated from them)."""
from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..models import PipelineInput, StepRun
from ..pipelines import pipeline_get
from ..services.validation import PayloadValidationError, input_payload_validate
from ..states import InputStatus
from . import conf


@extend_schema_field(
    {
        "type": "object",
        "description": "The input: an object with a non-empty `text` (the steps work on it) and any other JSON members.",
        "properties": {"text": {"type": "string", "minLength": 1, "maxLength": conf.get("MAX_TEXT_CHARS"), "pattern": r"\S"}},
        "required": ["text"],
        "additionalProperties": True,
    }
)
class PayloadField(serializers.JSONField):
    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        # The one validator the submit command uses too (services.validation).
        try:
            return input_payload_validate(payload=value)
        except PayloadValidationError as error:
            raise serializers.ValidationError(error.message, code=error.code) from None


@extend_schema_field({"type": "string", "enum": sorted(settings.PIPELINES), "description": "A declared pipeline (GET /api/v1/pipelines/)."})
class PipelineNameField(serializers.CharField):
    pass


class InputSubmitSerializer(serializers.Serializer):
    pipeline = PipelineNameField(max_length=100, help_text="Name of a declared pipeline (GET /api/v1/pipelines/).")
    payload = PayloadField(help_text="The input the pipeline works on.")

    def validate_pipeline(self, value: str) -> str:
        pipeline_get(name=value)  # raises UnknownPipelineError: 400 with code unknown_pipeline
        return value


class StepSerializer(serializers.ModelSerializer):
    class Meta:
        model = StepRun
        fields = ["step", "position", "status", "attempts_used", "next_attempt_at", "started_at", "finished_at", "last_error"]


class InputSerializer(serializers.ModelSerializer):
    steps = StepSerializer(many=True, read_only=True, help_text="The pipeline's steps in order.")

    class Meta:
        model = PipelineInput
        fields = ["id", "pipeline", "status", "payload", "idempotency_key", "created_at", "updated_at", "finished_at", "steps"]


class AttemptSerializer(serializers.Serializer):
    number = serializers.IntegerField(help_text="1, 2, 3… per step; the fencing token.")
    status = serializers.CharField(help_text="RUNNING, SUCCEEDED, FAILED, UNKNOWN, TIMED_OUT or FENCED.")
    started_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    error_type = serializers.CharField(allow_blank=True)
    error_message = serializers.CharField(allow_blank=True)


class StepDetailSerializer(StepSerializer):
    output = serializers.JSONField(allow_null=True, help_text="What the step returned (null until it succeeded).")
    attempts = AttemptSerializer(many=True, help_text="Every attempt at this step, in order.")

    class Meta(StepSerializer.Meta):
        fields = [*StepSerializer.Meta.fields, "output", "attempts"]


class AttemptSummarySerializer(serializers.Serializer):
    total = serializers.IntegerField(help_text="Attempts started across all steps.")
    by_status = serializers.DictField(child=serializers.IntegerField(), help_text="Attempts per status.")


class InputErrorSerializer(serializers.Serializer):
    step = serializers.CharField()
    attempt = serializers.IntegerField()
    status = serializers.CharField()
    error_type = serializers.CharField(allow_blank=True)
    error_message = serializers.CharField(allow_blank=True)
    at = serializers.DateTimeField(allow_null=True)


class InputDetailSerializer(InputSerializer):
    steps = StepDetailSerializer(many=True, read_only=True, help_text="The steps with their outputs and attempts.")
    attempt_summary = AttemptSummarySerializer(read_only=True)
    errors = InputErrorSerializer(many=True, read_only=True, help_text="Errors of failed, unknown-outcome and fenced attempts.")

    class Meta(InputSerializer.Meta):
        fields = [*InputSerializer.Meta.fields, "attempt_summary", "errors"]


class InputListFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=InputStatus.choices, required=False, help_text="Only inputs in this status.")
    pipeline = serializers.CharField(max_length=100, required=False, help_text="Only inputs of this pipeline.")
    created_after = serializers.DateTimeField(required=False, help_text="Only inputs created at or after this time (ISO 8601).")
    created_before = serializers.DateTimeField(required=False, help_text="Only inputs created before this time (ISO 8601).")


class OperatorActionRequestSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, help_text="Why (required; written to the audit trail).")


class RetryRequestSerializer(OperatorActionRequestSerializer):
    force = serializers.BooleanField(
        default=False,
        help_text="Also retry steps whose live attempt holds the lease (fences that attempt). Needs the forced-retry permission.",
    )


class ActionDecisionSerializer(serializers.Serializer):
    target_type = serializers.CharField()
    target_id = serializers.CharField()
    acts = serializers.BooleanField(help_text="True if the action was applied to this target.")
    kind = serializers.CharField()
    reason = serializers.CharField()


class ActionReportSerializer(serializers.Serializer):
    action = serializers.CharField()
    done = serializers.IntegerField(help_text="Targets acted on.")
    skipped = serializers.IntegerField(help_text="Targets skipped (the decisions say why).")
    message = serializers.CharField(help_text="One line for a human, e.g. '1 queued, 1 skipped: already completed'.")
    decisions = ActionDecisionSerializer(many=True)
    input = InputSerializer(help_text="The input after the action.")


class PipelineSerializer(serializers.Serializer):
    name = serializers.CharField()
    steps = serializers.ListField(child=serializers.CharField(), help_text="Step names in order.")
    description = serializers.CharField(allow_blank=True)


class ProblemSerializer(serializers.Serializer):
    """RFC 9457 problem details; every API error has this shape."""

    type = serializers.CharField(help_text="URI of the problem type: urn:problem-type:<code>.")
    title = serializers.CharField(help_text="Short summary of the problem type.")
    status = serializers.IntegerField(help_text="The HTTP status code.")
    detail = serializers.CharField(help_text="What went wrong with this request.")
    code = serializers.CharField(help_text="Stable machine-readable code, e.g. idempotency_key_in_progress.")
    errors = serializers.JSONField(required=False, help_text="For validation errors: a list of {field, code, message}.")
