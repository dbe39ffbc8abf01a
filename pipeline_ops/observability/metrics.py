"""``/metrics`` in the Prometheus text format.

Two kinds of numbers:

* **from the database, computed at scrape** (``DatabaseCollector``): attempts by status, fenced
  late writes, replays, the step latency histogram, inputs by status, queue depth, stuck leases
  and the oldest PROCESSING age. Steps run in qcluster workers on any host; the database is the
  one place that sees all of them, so every web process reports the same, complete numbers and
  nothing needs aggregating across processes.
* **counted in the web process** (``HTTP_RESPONSES``, via ``ResponseMetricsMiddleware``): API
  responses by status and error ``code`` (409 key in progress, 422 key reused, ...). Under
  gunicorn set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, wiped at deploy) and
  prometheus-client keeps these counters in shared files that every worker's scrape adds up.

Counts of rows (attempts, replays, fenced writes, inputs, step runs, the latency histogram) add
what the history purge deleted (``PurgedTally``), so none of them goes backwards when old
history is purged.
"""
from __future__ import annotations

import json
import os

from django.db.models import Count, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .latency import LATENCY_BUCKETS_SECONDS

PREFIX = "pipeline_ops"

# The *_created series double every counter's output and no dashboard of ours reads them.
disable_created_metrics()


# Process-local metrics live in their own registry: the default one also carries process and
# platform collectors that are meaningless (and wrong) when several gunicorn workers are summed.
LOCAL_REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_RESPONSES = Counter(
    f"{PREFIX}_http_responses",
    "HTTP responses by status and, for JSON errors, their stable error code (409 = key in progress, 422 = key reused).",
    ["status", "code"],
    registry=LOCAL_REGISTRY,
)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def _error_code(response: HttpResponse) -> str:
    """The ``code`` of a JSON error body (problem+json or plain JSON), or "" if there is none."""
    if response.status_code < 400 or getattr(response, "streaming", False):
        return ""
    if "json" not in response.get("Content-Type", ""):
        return ""
    content = response.content
    if not content or len(content) > 64 * 1024:
        return ""
    try:
        body = json.loads(content)
    except ValueError:
        return ""
    code = body.get("code") if isinstance(body, dict) else None
    # Codes are stable snake_case identifiers; anything else would explode label cardinality.
    if isinstance(code, str) and len(code) <= 64 and code.replace("_", "").isalnum():
        return code
    return ""


class ResponseMetricsMiddleware:
    """Counts every response by status and error code. Sits near the top of MIDDLEWARE so that
    responses produced by other middleware (throttling, body limits) are counted too."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        try:
            HTTP_RESPONSES.labels(status=str(response.status_code), code=_error_code(response)).inc()
        except Exception:  # counting must never break a response
            pass
        return response


class DatabaseCollector(Collector):
    """Gauges and counters read from the database at scrape time (a handful of indexed queries)."""

    def collect(self):
        from idempotency.models import IdempotencyRecord
        from idempotency.states import AttemptStatus

        from ..models import StepRun
        from ..selectors.dashboard import attempts_count_by_status, inputs_count_by_status, leases_summary, queue_depth

        # Every figure counted from rows is the rows' count plus what the history purge deleted
        # (PurgedTally, added in the transaction of each delete): nothing goes backwards when
        # old history goes. Only rows in a final status are ever purged.
        from idempotency.purge import purged_totals

        from ..services.retention import INPUTS_TALLY, STEP_RUNS_TALLY, step_runs_from_tally

        now = timezone.now()
        attempts = attempts_count_by_status()
        purged_attempts = purged_totals("attempts")
        family = GaugeMetricFamily(
            f"{PREFIX}_attempts",
            "Attempts by status (outcome), purged history included; RUNNING ones are in progress.",
            labels=["status"],
        )
        for status, n in sorted(attempts.items()):
            family.add_metric([status], n + purged_attempts.get(status, 0))
        yield family

        yield CounterMetricFamily(
            f"{PREFIX}_fenced_late_writes",
            "Attempts that finished after losing their key: their write was refused (duplicates prevented).",
            value=attempts.get(AttemptStatus.FENCED, 0) + purged_attempts.get(AttemptStatus.FENCED, 0),
        )

        replays = CounterMetricFamily(
            f"{PREFIX}_idempotent_replays",
            "Calls answered from a stored result instead of running again, by scope kind (step, or the part before ':').",
            labels=["scope"],
        )
        by_kind: dict[str, int] = {}
        live = IdempotencyRecord.objects.order_by().values_list("scope").annotate(n=Sum("replay_count")).values_list("scope", "n")
        for scope, n in [*live, *purged_totals("replays").items()]:
            kind = scope.split(":", 1)[0] or "default"
            by_kind[kind] = by_kind.get(kind, 0) + (n or 0)
        for kind, n in sorted(by_kind.items()):
            replays.add_metric([kind], n)
        yield replays

        yield self._latency()

        purged_inputs = purged_totals(INPUTS_TALLY)
        inputs = GaugeMetricFamily(f"{PREFIX}_inputs", "Pipeline inputs by status, purged history included.", labels=["status"])
        for status, n in sorted(inputs_count_by_status().items()):
            inputs.add_metric([status], n + purged_inputs.get(status, 0))
        yield inputs

        step_counts = step_runs_from_tally(purged_totals(STEP_RUNS_TALLY))
        for step, status, n in StepRun.objects.order_by().values_list("step", "status").annotate(n=Count("pk")):
            step_counts[(step, status)] = step_counts.get((step, status), 0) + n
        steps = GaugeMetricFamily(
            f"{PREFIX}_step_runs", "Step runs by step and status, purged history included.", labels=["step", "status"],
        )
        for (step, status), n in sorted(step_counts.items()):
            steps.add_metric([step, status], n)
        yield steps

        leases = leases_summary(now=now)
        yield GaugeMetricFamily(f"{PREFIX}_processing_keys", "Idempotency keys held by an attempt (PROCESSING).", value=leases.processing)
        yield GaugeMetricFamily(
            f"{PREFIX}_stuck_leases", "PROCESSING keys whose lease expired: the worker died or stalled.", value=leases.stuck
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_processing_age_seconds",
            "Age of the oldest attempt still holding its key (0 when none).",
            value=leases.oldest_processing_age_seconds or 0.0,
        )

        queue = queue_depth()
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Tasks on the django-q2 queue: ready (waiting) and in_flight (taken by a cluster).",
            labels=["broker", "state"],
        )
        if queue.ready is not None:
            depth.add_metric([queue.broker, "ready"], queue.ready)
        if queue.in_flight is not None:
            depth.add_metric([queue.broker, "in_flight"], queue.in_flight)
        yield depth
        yield GaugeMetricFamily(f"{PREFIX}_broker_up", "1 when the queue could be read at scrape time.", value=0 if queue.error else 1)

    def _latency(self) -> HistogramMetricFamily:
        """Finished attempts' durations (claim to ending), per step, as a cumulative histogram:
        the step runs still in the database plus what the history purge deleted (its tally)."""
        from idempotency.purge import purged_totals

        from ..models import StepRun
        from .latency import step_latency_rows
        from ..services.retention import LATENCY_TALLY, latency_from_tally

        by_step = latency_from_tally(purged_totals(LATENCY_TALLY))
        for row in step_latency_rows(step_runs=StepRun.objects.all()):
            kept = by_step.setdefault(row["step"], {"count": 0, "seconds": 0.0, **{f"le_{i}": 0 for i in range(len(LATENCY_BUCKETS_SECONDS))}})
            for name, value in row.items():
                if name != "step":
                    kept[name] += value
        family = HistogramMetricFamily(
            f"{PREFIX}_step_latency_seconds",
            "Duration of finished step attempts, from claim to their ending, by step (purged history included).",
            labels=["step"],
        )
        for step, row in sorted(by_step.items()):
            family.add_metric(
                [step],
                buckets=[(str(b), row[f"le_{i}"]) for i, b in enumerate(LATENCY_BUCKETS_SECONDS)] + [("+Inf", row["count"])],
                sum_value=row["seconds"],
            )
        return family


def metrics_exposition() -> bytes:
    """The full exposition: process-local counters (summed over gunicorn workers when
    PROMETHEUS_MULTIPROC_DIR is set) followed by the database-derived families."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        local = CollectorRegistry(auto_describe=True)
        multiprocess.MultiProcessCollector(local)
    else:
        local = LOCAL_REGISTRY
    database = CollectorRegistry(auto_describe=False)
    database.register(DatabaseCollector())
    return generate_latest(local) + generate_latest(database)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics. Unauthenticated, like every Prometheus target: keep it off the public
    network (bind, firewall, or a reverse-proxy rule), it holds counts, not data."""
    return HttpResponse(metrics_exposition(), content_type=CONTENT_TYPE_LATEST)
