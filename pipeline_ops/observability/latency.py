"""Step attempt durations as histogram rows: read by ``/metrics`` over every step run, and by the
history purge over the step runs it is about to delete (so the histogram never goes backwards)."""
from __future__ import annotations

from datetime import timedelta

from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, QuerySet, Sum

# Seconds. AI steps take from milliseconds (offline steps) to minutes (a slow model).
LATENCY_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def step_latency_rows(*, step_runs: QuerySet) -> list[dict]:
    """Per step: ``count`` of finished attempts, ``seconds`` (their summed duration, claim to
    ending) and ``le_<i>`` (how many took at most ``LATENCY_BUCKETS_SECONDS[i]``)."""
    duration = ExpressionWrapper(
        F("idempotency_record__attempts__finished_at") - F("idempotency_record__attempts__started_at"),
        output_field=DurationField(),
    )
    buckets = {f"le_{i}": Count("pk", filter=Q(duration__lte=timedelta(seconds=b))) for i, b in enumerate(LATENCY_BUCKETS_SECONDS)}
    rows = list(
        step_runs.filter(idempotency_record__attempts__finished_at__isnull=False)
        .alias(duration=duration)
        .order_by()
        .values("step")
        .annotate(count=Count("pk"), total=Sum("duration"), **buckets)
        .order_by("step")
    )
    for row in rows:
        total = row.pop("total")
        row["seconds"] = total.total_seconds() if isinstance(total, timedelta) else float(total or 0) / 1e6
    return rows
