"""Reads for operators: plain functions returning dataclasses, shared by the admin dashboard,
``pipeline_status`` and ``/metrics``. Each is a handful of indexed, aggregated queries, so they
stay fast on 100k+ rows."""
from .dashboard import (  # noqa: F401
    AttemptSeriesPoint,
    ClusterHeartbeat,
    Dashboard,
    LeaseSummary,
    QueueDepth,
    StepFailureRate,
    WorkerHost,
    attempts_count_by_status,
    attempts_series,
    cluster_heartbeats,
    dashboard_get,
    inputs_count_by_status,
    leases_summary,
    queue_depth,
    step_failure_rates,
    workers_by_host,
    workers_seen,
)
