"""Settings for bench/pipeline_throughput.py only: the product's settings plus a bench-only pipeline
of three no-op steps and the bare django-q2 baseline task. Never part of the product's PIPELINES.

Two environment variables let the bench run a *tuned* bare django-q2 beside the product's own
settings without touching them. django-q2 reads ``Q_CLUSTER`` once at import and every qcluster is
its own process, so each variant is a process (driver and cluster) with its own environment:

* ``BENCH_Q_CLUSTER``: a JSON object whose keys replace those of the product's ``Q_CLUSTER``
  (e.g. ``{"bulk": 4, "queue_limit": 4, "poll": 0.05, "save_limit": -1}``);
* ``BENCH_CONN_HEALTH_CHECKS``: ``0`` or ``1``, replaces ``DATABASES["default"]["CONN_HEALTH_CHECKS"]``.

Unset (the guarded side and bare-same-settings), the product's settings are used as they are.
"""
import json
import os

os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-not-for-production")

from pipeline_ops.settings import *  # noqa: E402,F403
from pipeline_ops.settings import DATABASES, PIPELINES, Q_CLUSTER  # noqa: E402

BENCH_STEPS = ["bench_noop_1", "bench_noop_2", "bench_noop_3"]
PIPELINES = {**PIPELINES, "bench_noop": {"description": "Benchmark only: three no-op steps.", "steps": BENCH_STEPS}}

if os.environ.get("BENCH_Q_CLUSTER"):
    Q_CLUSTER = {**Q_CLUSTER, **json.loads(os.environ["BENCH_Q_CLUSTER"])}
if os.environ.get("BENCH_CONN_HEALTH_CHECKS", "") != "":
    DATABASES = {**DATABASES, "default": {**DATABASES["default"],
                                          "CONN_HEALTH_CHECKS": os.environ["BENCH_CONN_HEALTH_CHECKS"] == "1"}}


def _noop_step(ctx):
    return {}


def _register() -> None:
    from idempotency.policy import RetryPolicy
    from pipeline_ops.steps import Step, step_register

    for name in BENCH_STEPS:
        step_register(Step(name=name, func=_noop_step, policy=RetryPolicy(max_attempts=3)), replace_existing=True)


_register()

_broker = None


def bare_broker():
    """One django-q2 broker per process (built on first use, after the worker's fork): without
    ``broker=``, ``async_task`` builds a new one per enqueue (a new Redis client each time)."""
    global _broker
    if _broker is None:
        from django_q.brokers import get_broker

        _broker = get_broker()
    return _broker


def bare_noop(i: int, position: int, chain: str) -> None:
    """The baseline: a plain django-q2 task that does nothing but enqueue the next of three; the
    last one marks its chain done (django-q2 saves no success rows with the product's settings)."""
    if position + 1 < len(BENCH_STEPS):
        from django_q.tasks import async_task

        async_task("pipeline_throughput_settings.bare_noop", i, position + 1, chain, group="bench_bare",
                   broker=bare_broker())
        return
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO bench_bare_done (chain) VALUES (%s)", [chain])
