"""Settings for bench/pipeline_throughput.py only: the product's settings plus a bench-only pipeline
of three no-op steps and the bare django-q2 baseline task. Never part of the product's PIPELINES."""
import os

os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-not-for-production")

from pipeline_ops.settings import *  # noqa: E402,F403
from pipeline_ops.settings import PIPELINES  # noqa: E402

BENCH_STEPS = ["bench_noop_1", "bench_noop_2", "bench_noop_3"]
PIPELINES = {**PIPELINES, "bench_noop": {"description": "Benchmark only: three no-op steps.", "steps": BENCH_STEPS}}


def _noop_step(ctx):
    return {}


def _register() -> None:
    from idempotency.policy import RetryPolicy
    from pipeline_ops.steps import Step, step_register

    for name in BENCH_STEPS:
        step_register(Step(name=name, func=_noop_step, policy=RetryPolicy(max_attempts=3)), replace_existing=True)


_register()


def bare_noop(i: int, position: int, chain: str) -> None:
    """The baseline: a plain django-q2 task that does nothing but enqueue the next of three; the
    last one marks its chain done (django-q2 saves no success rows with the product's settings)."""
    if position + 1 < len(BENCH_STEPS):
        from django_q.tasks import async_task

        async_task("pipeline_throughput_settings.bare_noop", i, position + 1, chain, group="bench_bare")
        return
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO bench_bare_done (chain) VALUES (%s)", [chain])
