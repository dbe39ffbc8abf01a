"""API views: thin adapters from HTTP to the services (validation, the idempotency guard, selectors)."""
from __future__ import annotations

import io

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status as http
from rest_framework.exceptions import PermissionDenied
from rest_framework.generics import GenericAPIView
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.views import APIView

from idempotency.drf import KEY_HEADER, IdempotencyMixin, default_scope, parse_idempotency_key, problem_response
from idempotency.errors import KeyReusedError

from ..models import PipelineInput
from ..pipelines import pipeline_list
from ..services.inputs import input_submit
from . import conf, faults, selectors
from .errors import InputNotFoundError, LengthRequiredError, PayloadTooLargeError
from .pagination import InputCursorPagination
from .permissions import FORCE_RETRY_PERMISSION, CanCancelInputs, CanRetryInputs
from .serializers import (
    ActionReportSerializer,
    InputDetailSerializer,
    InputListFilterSerializer,
    InputSerializer,
    InputSubmitSerializer,
    OperatorActionRequestSerializer,
    PipelineSerializer,
    ProblemSerializer,
    RetryRequestSerializer,
)
from .throttles import ApiClientRateThrottle

PROBLEM = "application/problem+json"


def _problems(*statuses: int) -> dict:
    """OpenAPI responses for error statuses, all problem+json."""
    texts = {
        400: "Invalid request (validation_error, unknown_pipeline, idempotency_key_missing, idempotency_key_malformed, parse_error).",
        401: "No or bad credentials (not_authenticated, authentication_failed).",
        403: "Missing permission (permission_denied).",
        404: "Not found, or another client's (not_found).",
        409: "idempotency_key_in_progress: the first request with this key is still running; see Retry-After.",
        413: "The body is larger than the limit (payload_too_large).",
        415: "Not JSON (unsupported_media_type).",
        422: "idempotency_key_reused: this key was used with another method, path or body.",
        429: "Too many requests for this client (throttled); see Retry-After.",
    }
    return {(code, PROBLEM): OpenApiResponse(ProblemSerializer, description=texts.get(code, "Error.")) for code in statuses}


class ApiView(APIView):
    throttle_classes = [ApiClientRateThrottle]
    # JSON only: a payload is a nested object, which a form cannot carry.
    parser_classes = [JSONParser]

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        limit = conf.get("MAX_BODY_BYTES")
        if _is_chunked(request._request):
            _chunked_body_read(request._request, limit=limit)
            return
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > limit:
            raise PayloadTooLargeError(f"The request body has {length} bytes; at most {limit} are accepted.")


def _is_chunked(django_request) -> bool:
    meta = django_request.META
    return not meta.get("CONTENT_LENGTH") and "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower()


def _chunked_body_read(django_request, *, limit: int) -> None:
    """A body sent with ``Transfer-Encoding: chunked`` has no Content-Length, so Django reads it
    as empty (a valid POST answered "required", a 10 MB one not refused). A server that de-chunks
    (gunicorn: ``wsgi.input_terminated``) gives the body on ``wsgi.input`` up to its end: read at
    most ``limit + 1`` bytes of it (413 beyond ``limit``, without reading the rest) and hand
    them to the parsers as an ordinary body. A server that does not (Django's runserver) cannot
    give the body at all: 411 says so instead of parsing nothing."""
    meta = django_request.META
    if not meta.get("wsgi.input_terminated"):
        raise LengthRequiredError()
    data = meta["wsgi.input"].read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"The chunked request body exceeds {limit} bytes; at most {limit} are accepted.")
    django_request._stream = io.BytesIO(data)
    django_request._read_started = False
    meta["CONTENT_LENGTH"] = str(len(data))


IDEMPOTENCY_KEY_PARAMETER = OpenApiParameter(
    name=KEY_HEADER, location=OpenApiParameter.HEADER, required=True, type=OpenApiTypes.STR,
    description=(
        "Required. 1-255 printable ASCII characters, bare or as an RFC 8941 quoted string (\"abc\"). "
        "Scoped to your client; kept for the retention period (IDEMPOTENCY RETENTION_HOURS, default 24 h)."
    ),
    pattern=r"^ *[!-~][ -~]{0,250}$",
)
PREFER_PARAMETER = OpenApiParameter(
    name="Prefer", location=OpenApiParameter.HEADER, required=False, type=OpenApiTypes.STR,
    description="`wait=N` (RFC 7240): if the first request with this key is still running, wait up to N seconds "
    "(capped by IDEMPOTENCY MAX_WAIT_SECONDS) for it and replay its response instead of answering 409.",
    pattern=r"^wait=[0-9]{1,2}$",
)


RESPONSE_HEADERS = [
    OpenApiParameter(name="Location", location=OpenApiParameter.HEADER, type=OpenApiTypes.URI, response=[200, 201],
                     description="URL of the input (GET it to follow the input's fate)."),
    OpenApiParameter(name="Idempotent-Replayed", location=OpenApiParameter.HEADER, type=OpenApiTypes.STR, response=[200, 201],
                     enum=["true"], description="`true` when this is the stored response of an earlier request with the same key."),
    OpenApiParameter(name="Preference-Applied", location=OpenApiParameter.HEADER, type=OpenApiTypes.STR, response=[200, 201, 409],
                     description="`wait=N` when the server honoured `Prefer: wait=N` (N as capped) and waited for the first "
                     "request; on a 409 the first was still running when the wait ran out."),
    OpenApiParameter(name="Retry-After", location=OpenApiParameter.HEADER, type=OpenApiTypes.INT, response=[409, 429],
                     description="Seconds to wait before retrying (the first request's lease, or the throttle window)."),
]


class InputListCreateApi(IdempotencyMixin, ApiView, GenericAPIView):
    """Submit inputs (idempotently) and list the inputs you may see."""

    serializer_class = InputSerializer
    pagination_class = InputCursorPagination

    def get_queryset(self):
        return selectors.input_list_visible(user=self.request.user)

    def get_idempotency_operation(self, request) -> str:
        # A fixed name, not the request's path: the bench's unguarded twin must not matter here.
        return "POST /api/v1/inputs/"

    def idempotency_claimed(self, request, attempt) -> None:
        faults.fault_point(faults.SLEEP_BEFORE_WORK)
        faults.fault_point(faults.HOLD_BEFORE_WORK, attempt=attempt)

    @extend_schema(
        operation_id="inputs_list",
        parameters=[InputListFilterSerializer],
        responses={200: InputSerializer(many=True), **_problems(400, 401, 429)},
        summary="List inputs",
        description="Your inputs (operators: everyone's), newest first, with cursor pagination.",
    )
    def get(self, request):
        filters = InputListFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        inputs = selectors.input_list_visible(user=request.user, **filters.validated_data)
        page = self.paginate_queryset(inputs)
        return self.get_paginated_response(InputSerializer(page, many=True).data)

    @extend_schema(
        operation_id="inputs_create",
        request=InputSubmitSerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER, PREFER_PARAMETER, *RESPONSE_HEADERS],
        responses={
            201: OpenApiResponse(InputSerializer, description="Created (or, with `Idempotent-Replayed: true`, the first response replayed). `Location` names the input."),
            200: OpenApiResponse(InputSerializer, description="The key's record expired but its input exists: that input (same pipeline and payload)."),
            **_problems(400, 401, 409, 413, 415, 422, 429),
        },
        summary="Submit an input (idempotent)",
        examples=[OpenApiExample("text", value={"pipeline": "default", "payload": {"text": "The service was great."}}, request_only=True)],
    )
    def post(self, request):
        key = parse_idempotency_key(request.headers.get(KEY_HEADER))  # 400 before anything else
        submission = InputSubmitSerializer(data=request.data)
        submission.is_valid(raise_exception=True)  # 400 stores nothing: the key stays free
        data = submission.validated_data
        response = self.idempotent_response(request, perform=lambda: self._create(request, key=key, **data))
        faults.fault_point(faults.KILL_AFTER_COMMIT)
        return response

    def _create(self, request, *, key: str, pipeline: str, payload: dict) -> Response:
        # Runs inside the transaction that completes the key: the input, its steps, the first
        # step's queue row (ORM broker) and the stored response commit together.
        result = input_submit(pipeline=pipeline, payload=payload, scope=default_scope(request), key=key, submitted_by=request.user)
        if not result.created and (result.input.pipeline, result.input.payload) != (pipeline, payload):
            raise KeyReusedError("This Idempotency-Key already created an input with another pipeline or payload.")
        faults.fault_point(faults.ERROR_BEFORE_COMMIT)
        faults.fault_point(faults.KILL_BEFORE_COMMIT)
        location = request.build_absolute_uri(reverse("api:input-detail", kwargs={"input_id": result.input.pk}))
        return Response(
            InputSerializer(result.input).data, status=http.HTTP_201_CREATED if result.created else http.HTTP_200_OK,
            headers={"Location": location},
        )


class InputCreateUnguardedApi(ApiView):
    """The benchmark's baseline: the same submission without the idempotency layer. Mounted only
    when ``PIPELINE_OPS_API_BENCH`` is on; never in production."""

    @extend_schema(exclude=True)
    def post(self, request):
        key = parse_idempotency_key(request.headers.get(KEY_HEADER))
        submission = InputSubmitSerializer(data=request.data)
        submission.is_valid(raise_exception=True)
        result = input_submit(scope=default_scope(request), key=key, submitted_by=request.user, **submission.validated_data)
        location = request.build_absolute_uri(reverse("api:input-detail", kwargs={"input_id": result.input.pk}))
        return Response(InputSerializer(result.input).data, status=http.HTTP_201_CREATED, headers={"Location": location})


def _visible_input(request, input_id) -> PipelineInput:
    pipeline_input = selectors.input_get_visible(user=request.user, input_id=input_id)
    if pipeline_input is None:
        raise InputNotFoundError()
    return pipeline_input


class InputDetailApi(ApiView):
    @extend_schema(
        operation_id="inputs_retrieve",
        responses={200: InputDetailSerializer, **_problems(401, 404, 429)},
        summary="An input's status, step outputs, attempts and errors",
    )
    def get(self, request, input_id):
        pipeline_input = _visible_input(request, input_id)
        return Response(InputDetailSerializer(selectors.input_detail(pipeline_input=pipeline_input)).data)


def _report(report, pipeline_input: PipelineInput) -> dict:
    pipeline_input.refresh_from_db()
    return ActionReportSerializer({
        "action": report.action, "done": report.done, "skipped": report.skipped_total, "message": report.message,
        "decisions": [
            {"target_type": d.target_type, "target_id": d.target_id, "acts": d.acts, "kind": d.kind, "reason": d.reason}
            for d in report.decisions
        ],
        "input": pipeline_input,
    }).data


class InputRetryApi(ApiView):
    permission_classes = [*ApiView.permission_classes, CanRetryInputs]

    @extend_schema(
        operation_id="inputs_retry",
        request=RetryRequestSerializer,
        responses={200: ActionReportSerializer, **_problems(400, 401, 403, 404, 413, 415, 429)},
        summary="Retry an input's failed, waiting or stuck steps (safe: completed steps are skipped)",
        description="The admin's safe retry: a step already completed, or held by a live attempt (unless `force`), "
        "is skipped with the reason. Needs the 'retry step runs' permission (`force`: 'force retry'). Audited.",
    )
    def post(self, request, input_id):
        from ..services.operations import input_retry

        body = RetryRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if body.validated_data["force"] and not request.user.has_perm(FORCE_RETRY_PERMISSION):
            raise PermissionDenied("A forced retry needs the 'force retry step runs' permission.")
        pipeline_input = _visible_input(request, input_id)
        report = input_retry(
            pipeline_input=pipeline_input, actor=request.user, reason=body.validated_data["reason"], source="api",
            force=body.validated_data["force"],
        )
        return Response(_report(report, pipeline_input))


class InputCancelApi(ApiView):
    permission_classes = [*ApiView.permission_classes, CanCancelInputs]

    @extend_schema(
        operation_id="inputs_cancel",
        request=OperatorActionRequestSerializer,
        responses={200: ActionReportSerializer, **_problems(400, 401, 403, 404, 413, 415, 429)},
        summary="Cancel an unfinished input (finished inputs are skipped with the reason)",
        description="Pending and queued steps are cancelled; a running step's key is released so its attempt is "
        "fenced. Needs the 'cancel pipeline inputs' permission. Audited.",
    )
    def post(self, request, input_id):
        from ..services.operations import inputs_cancel

        body = OperatorActionRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        pipeline_input = _visible_input(request, input_id)
        report = inputs_cancel(inputs=[pipeline_input], actor=request.user, reason=body.validated_data["reason"], source="api")
        return Response(_report(report, pipeline_input))


class PipelineListApi(ApiView):
    @extend_schema(
        operation_id="pipelines_list",
        responses={200: PipelineSerializer(many=True), **_problems(401, 429)},
        summary="The declared pipelines and their steps",
    )
    def get(self, request):
        return Response(PipelineSerializer([{"name": p.name, "steps": list(p.steps), "description": p.description} for p in pipeline_list()], many=True).data)


def api_not_found(request, exception=None):
    """handler404 for /api/ paths: problem+json, like every other API error."""
    return problem_response(status=404, code="not_found", title="Not found.", detail=f"No API endpoint at {request.path}.")


def api_server_error(request):
    return problem_response(status=500, code="server_error", title="Internal server error", detail="The server failed to process the request.")

