"""Benchmark (not a test): the operations console's pages on a large PostgreSQL database.

Creates a scratch database, migrates it, fills it with ``--inputs`` inputs (3 step runs each,
their records and attempts: the same generator the admin tests use), then for each console page
measures the median time of a full request through the Django test client (session, permissions,
template) and its query count, against a baseline measured in the same run: a bare ORM fetch of
one page (50 rows) of the same table. Prints page/baseline ratios. Drops the scratch database.

    .venv/bin/python bench/console.py [--inputs 100000] [--repeat 5] [--database-url postgres://postgres@127.0.0.1:5432/postgres]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--verbose", action="store_true", help="Print each page's slowest SQL statement.")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    import dj_database_url
    import psycopg

    server = dj_database_url.parse(args.database_url)
    if "postgresql" not in server["ENGINE"]:
        raise SystemExit("bench/console.py measures PostgreSQL: give a postgres:// --database-url")
    scratch = f"bench_console_{os.getpid()}"
    admin_dsn = dict(host=server["HOST"] or "127.0.0.1", port=server["PORT"] or 5432, user=server["USER"] or "postgres",
                     password=server["PASSWORD"] or None, dbname=server["NAME"] or "postgres")
    with psycopg.connect(**admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{scratch}"')
    try:
        os.environ["DATABASE_URL"] = args.database_url.rsplit("/", 1)[0] + f"/{scratch}"
        os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
        os.environ["DJANGO_SETTINGS_MODULE"] = "pipeline_ops.settings"
        os.environ["PIPELINE_OPS_QUEUE"] = f"bench-console-{os.getpid()}"
        return run(args)
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(**admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')


def timed(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(args) -> int:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment
    from django.urls import reverse

    settings.ALLOWED_HOSTS = ["*"]
    setup_test_environment()
    call_command("migrate", verbosity=0)

    from django.contrib.auth import get_user_model

    from idempotency.models import Attempt, IdempotencyRecord
    from pipeline_ops.models import PipelineInput, StepRun
    from tests.admin.helpers import bulk_world

    start = time.perf_counter()
    sizes = bulk_world(inputs=args.inputs)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    print(f"filled in {time.perf_counter() - start:.1f} s: {sizes}")

    user = get_user_model().objects.create_superuser("bench", "bench@example.invalid", "pw")
    client = Client()
    client.force_login(user)
    some_input = PipelineInput.objects.filter(status="FAILED").first()

    def cl(name: str) -> str:
        return reverse(f"admin:{name}_changelist")

    baselines = {
        "inputs": lambda: list(PipelineInput.objects.order_by("-created_at")[:50]),
        "steps": lambda: list(StepRun.objects.order_by("-id")[:50]),
        "attempts": lambda: list(Attempt.objects.filter(status="FAILED").order_by("-started_at")[:50]),
        "records": lambda: list(IdempotencyRecord.objects.order_by("-id")[:50]),
    }
    pages = [
        ("inputs", "inputs list", cl("pipeline_ops_pipelineinput")),
        ("inputs", "inputs, status=FAILED + 24 h", cl("pipeline_ops_pipelineinput") + "?status__exact=FAILED&created_within=24h"),
        ("inputs", "inputs, search by id", cl("pipeline_ops_pipelineinput") + f"?q={some_input.pk}"),
        ("inputs", "input detail + timeline", reverse("admin:pipeline_ops_pipelineinput_change", args=[some_input.pk])),
        ("steps", "step runs, FAILED preprocess", cl("pipeline_ops_steprun") + "?status__exact=FAILED&step=preprocess"),
        ("attempts", "failed attempts", cl("pipeline_ops_failedattempt")),
        ("attempts", "failed, error type filter", cl("pipeline_ops_failedattempt") + "?error_type=ConnectionError"),
        ("attempts", "fenced attempts", cl("pipeline_ops_fencedattempt")),
        ("attempts", "stuck attempts", cl("pipeline_ops_stuckattempt")),
        ("records", "records, lease expired", cl("idempotency_idempotencyrecord") + "?status__exact=PROCESSING&lease=expired"),
        ("inputs", "dashboard", reverse("admin:pipeline_ops_dashboard")),
    ]
    base_times = {name: timed(fn, args.repeat) for name, fn in baselines.items()}
    print(f"\n{'page':34} {'median ms':>10} {'queries':>8} {'db ms':>8} {'worst ms':>8} {'baseline ms':>12} {'ratio':>7}")
    for base, label, url in pages:
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        queries: list[tuple[float, str]] = []

        def record(execute, sql, params, many, context):
            began = time.perf_counter()
            try:
                return execute(sql, params, many, context)
            finally:
                queries.append((time.perf_counter() - began, sql))

        # (CaptureQueriesContext would be emptied by the request_started signal.)
        with connection.execute_wrapper(record):
            client.get(url)
        page_time = timed(lambda: client.get(url), args.repeat)
        slowest = max(queries)
        db_ms = sum(q[0] for q in queries) * 1000
        print(f"{label:34} {page_time * 1000:10.1f} {len(queries):8d} {db_ms:8.1f} {slowest[0] * 1000:8.1f} "
              f"{base_times[base] * 1000:12.2f} {page_time / base_times[base]:7.1f}x")
        if args.verbose:
            print("    slowest:", slowest[1][:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
