"""The operations dashboard: a staff-only admin page drawn on the server (SVG, no JS, no CDN)."""
from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from idempotency.states import AttemptStatus

from ..models import DeadStepRun, RetryingStepRun
from ..selectors import dashboard_get
from ..states import InputStatus

CHART_WIDTH = 900
CHART_HEIGHT = 220
CHART_LEFT = 44
CHART_BOTTOM = 24
SERIES = (("succeeded", "#2e7d32", "succeeded"), ("failed", "#c62828", "failed / unknown"), ("fenced", "#f9a825", "fenced (late write refused)"))


def throughput_chart(points) -> dict:
    """Stacked bars per bucket: coordinates computed here so the template only draws."""
    plot_w = CHART_WIDTH - CHART_LEFT - 10
    plot_h = CHART_HEIGHT - CHART_BOTTOM - 10
    peak = max([p.succeeded + p.failed + p.fenced for p in points] + [1])
    slot = plot_w / max(len(points), 1)
    bars, labels = [], []
    for index, point in enumerate(points):
        x = CHART_LEFT + index * slot + 1
        y = 10 + plot_h
        for attr, colour, _ in SERIES:
            value = getattr(point, attr)
            if not value:
                continue
            height = value / peak * plot_h
            y -= height
            local = timezone.localtime(point.start)
            bars.append({"x": round(x, 1), "y": round(y, 1), "w": round(max(slot - 2, 1), 1), "h": round(height, 1), "colour": colour,
                         "title": f"{local:%H:%M}: {value} {attr}"})
        # Every third hour, and always the last bar (the current hour).
        if index % 3 == 0 or index == len(points) - 1:
            labels.append({"x": round(x + slot / 2, 1), "text": f"{timezone.localtime(point.start):%H:%M}"})
    grid = [{"y": round(10 + plot_h - plot_h * f, 1), "value": round(peak * f)} for f in (0, 0.5, 1)]
    return {
        "width": CHART_WIDTH, "height": CHART_HEIGHT, "bars": bars, "labels": labels, "grid": grid,
        "baseline": 10 + plot_h, "left": CHART_LEFT, "legend": SERIES, "peak": peak,
        "totals": {attr: sum(getattr(p, attr) for p in points) for attr, _, _ in SERIES},
    }


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def dashboard_view(request):
    # admin_view already requires an active staff user; the numbers are about inputs.
    if not request.user.has_perm("pipeline_ops.view_pipelineinput"):
        raise PermissionDenied
    data = dashboard_get()
    statuses = [(value, label) for value, label in InputStatus.choices]
    context = {
        **admin.site.each_context(request),
        "title": "Operations dashboard",
        "data": data,
        "retries": RetryingStepRun.objects.count(),
        "dead": DeadStepRun.objects.count(),
        "live_url": reverse("admin:pipeline_ops_live") + "?view=dashboard",
        "input_rows": [(label, value, data.inputs_last_hour[value], data.inputs_last_day[value]) for value, label in statuses],
        "chart": throughput_chart(data.series),
        "oldest_age": age_text(data.leases.oldest_processing_age_seconds),
        "attempt_rows": [(label, value, data.attempts_by_status[value]) for value, label in AttemptStatus.choices],
        "rates": [
            {"step": r.step, "succeeded": r.succeeded, "failed": r.failed, "active": r.active,
             "attempts": r.attempts, "attempts_failed": r.attempts_failed,
             "rate": None if r.attempt_rate is None else round(r.attempt_rate * 100, 1), "width": round((r.attempt_rate or 0) * 200, 1),
             "run_rate": None if r.rate is None else round(r.rate * 100, 1)}
            for r in data.step_failure_rates
        ],
    }
    return TemplateResponse(request, "admin/pipeline_ops/dashboard.html", context)
