"""The small JSON view the console's pages poll every few seconds (``static/pipeline_ops/live.js``):
the dashboard's numbers, an input's step statuses, and a version of each failure list, so a
page shows what changed without the operator clicking "refresh". Read-only, staff only, the
page's own view permission; a few aggregate queries per call."""
from __future__ import annotations

import hashlib

from django.core.exceptions import PermissionDenied
from django.db.models import Count, Max
from django.http import Http404, JsonResponse
from django.utils import timezone

from idempotency.models import Attempt

from ..models import DeadStepRun, FailedAttempt, FencedAttempt, PipelineInput, RetryingStepRun, StepRun, StuckAttempt, UnknownOutcomeAttempt
from ..selectors import dashboard_get
from .dashboard import age_text

POLL_SECONDS = 5

LISTS = {
    "retryingsteprun": RetryingStepRun, "deadsteprun": DeadStepRun, "steprun": StepRun, "pipelineinput": PipelineInput,
    "failedattempt": FailedAttempt, "unknownoutcomeattempt": UnknownOutcomeAttempt, "fencedattempt": FencedAttempt,
    "stuckattempt": StuckAttempt,
}


def _require(request, model) -> None:
    if not request.user.has_perm(f"{model._meta.app_label}.view_{model._meta.model_name}"):
        raise PermissionDenied


def _dashboard(request) -> dict:
    _require(request, PipelineInput)
    data = dashboard_get()
    metrics = {
        "duplicates_prevented": data.duplicates_prevented,
        "unknown_outcomes": data.unknown_outcomes,
        "stuck_leases": data.leases.stuck,
        "processing": data.leases.processing,
        "oldest_processing_age": age_text(data.leases.oldest_processing_age_seconds),
        "failed_attempts": data.attempts_by_status.get("FAILED", 0),
        "queue_depth": data.queue.ready if data.queue.ready is not None else "?",
        "retries": RetryingStepRun.objects.count(),
        "dead": DeadStepRun.objects.count(),
    }
    for status, n in data.inputs_last_hour.items():
        metrics[f"inputs_hour_{status}"] = n
    for status, n in data.inputs_last_day.items():
        metrics[f"inputs_day_{status}"] = n
    for status, n in data.attempts_by_status.items():
        metrics[f"attempts_{status}"] = n
    for r in data.step_failure_rates:
        metrics[f"rate_{r.step}"] = "—" if r.attempt_rate is None else f"{r.attempt_rate * 100:.1f} %"
        metrics[f"rate_attempts_{r.step}"] = f"{r.attempts_failed} of {r.attempts}"
    return {"metrics": metrics, "as_of": timezone.localtime(data.now).strftime("%Y-%m-%d %H:%M:%S %Z")}


def _input(request) -> dict:
    _require(request, PipelineInput)
    try:
        pipeline_input = PipelineInput.objects.get(pk=request.GET.get("id", ""))
    except (PipelineInput.DoesNotExist, ValueError, Exception):
        raise Http404("No such input.") from None
    steps = list(StepRun.objects.filter(input=pipeline_input).order_by("position").values_list("step", "status", "attempts_used", "idempotency_record_id"))
    record_ids = [r for *_, r in steps if r]
    attempts = list(Attempt.objects.filter(record_id__in=record_ids).order_by("pk").values_list("pk", "status"))
    metrics = {"input_status": pipeline_input.get_status_display(), "attempt_count": len(attempts)}
    labels = dict(StepRun._meta.get_field("status").choices)
    for step, status, used, _ in steps:
        metrics[f"step_{step}"] = labels.get(status, status)
    version = hashlib.sha256(repr((pipeline_input.status, steps, attempts)).encode()).hexdigest()[:16]
    return {"metrics": metrics, "version": version}


def _list(request) -> dict:
    model = LISTS.get(request.GET.get("model", ""))
    if model is None:
        raise Http404("No such list.")
    _require(request, model)
    newest = "updated_at" if hasattr(model, "updated_at") else "pk"
    summary = model._default_manager.order_by().aggregate(n=Count("pk"), newest=Max(newest))
    version = hashlib.sha256(repr((summary["n"], str(summary["newest"]))).encode()).hexdigest()[:16]
    return {"metrics": {"count": summary["n"]}, "version": version}


VIEWS = {"dashboard": _dashboard, "input": _input, "list": _list}


def live_view(request):
    """``?view=dashboard``, ``?view=input&id=<uuid>`` or ``?view=list&model=<model name>``."""
    handler = VIEWS.get(request.GET.get("view", ""))
    if handler is None:
        raise Http404("Unknown live view.")
    body = handler(request)
    body["poll_seconds"] = POLL_SECONDS
    response = JsonResponse(body)
    response["Cache-Control"] = "no-store"
    return response
