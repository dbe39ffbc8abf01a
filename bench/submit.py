"""Benchmark (not a test): ``manage.py submit`` of N generated lines on PostgreSQL.

Creates a scratch database, migrates it, and in one run measures:
  * the first run of ``submit`` (every line new: input + 3 step runs + 1 queued task each), inputs/s;
  * a re-run of the same file (nothing new), lines/s;
  * the baseline: a plain ``bulk_create`` of the same input rows in the same batch size (no step
    runs, no tasks, no duplicate detection), rows/s; both rates are printed as a ratio of it;
  * for comparison, the first run with one ``async_task`` per new step instead of one bulk insert
    of the queue rows (``--compare-each``).
Drops the scratch database at the end.

    .venv/bin/python bench/submit.py [--lines 20000] [--batch-size 500] [--database-url postgres://postgres@127.0.0.1:5432/postgres]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--broker", choices=("postgres", "orm"), default="postgres",
                        help="the table broker the enqueues go to (default: postgres, the default on PostgreSQL)")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres",
                        help="Server to create the scratch database on (it must be PostgreSQL).")
    parser.add_argument("--compare-each", action="store_true", help="Also time one async_task per step instead of a bulk enqueue.")
    args = parser.parse_args()

    import dj_database_url
    import psycopg

    server = dj_database_url.parse(args.database_url)
    if "postgresql" not in server["ENGINE"]:
        raise SystemExit("bench/submit.py measures PostgreSQL: give a postgres:// --database-url")
    scratch = f"bench_submit_{os.getpid()}"
    admin_dsn = dict(host=server["HOST"] or "127.0.0.1", port=server["PORT"] or 5432, user=server["USER"] or "postgres",
                     password=server["PASSWORD"] or None, dbname=server["NAME"] or "postgres")
    with psycopg.connect(**admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{scratch}"')
    try:
        url = args.database_url.rsplit("/", 1)[0] + f"/{scratch}"
        os.environ["DATABASE_URL"] = url
        os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pipeline_ops.settings")
        os.environ["PIPELINE_OPS_BROKER"] = args.broker
        os.environ["PIPELINE_OPS_QUEUE"] = f"bench-submit-{os.getpid()}"
        return run(args)
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(**admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(args) -> int:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction
    from django_q.models import OrmQ

    from pipeline_ops.models import PipelineInput, StepRun
    from pipeline_ops.services.submissions import inputs_submit_stream, submission_key_default

    call_command("migrate", verbosity=0)
    rows = [{"text": f"Generated review number {i}: the service was {'good' if i % 3 else 'slow'}.", "n": i}
            for i in range(args.lines)]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        path = handle.name

    def submit() -> dict:
        out = io.StringIO()
        call_command("submit", path, "--json", "--no-progress", "--batch-size", str(args.batch_size), stdout=out)
        return json.loads(out.getvalue())

    def baseline() -> None:
        # The same input rows, keyed the same way, inserted with nothing else: no conflict handling,
        # no step runs, no queue rows. What the database costs for the data alone.
        for start in range(0, len(rows), args.batch_size):
            with transaction.atomic():
                PipelineInput.objects.bulk_create([
                    PipelineInput(id=uuid.uuid4(), pipeline="default", payload=row, submission_scope="baseline",
                                  idempotency_key=submission_key_default(pipeline="default", payload=row))
                    for row in rows[start:start + args.batch_size]
                ])

    try:
        _, base_s = timed(baseline)
        first, first_s = timed(submit)
        again, again_s = timed(submit)
        assert first["created"] == args.lines and first["errors"] == 0, first
        assert again["created"] == 0 and again["already_submitted"] == args.lines, again
        assert StepRun.objects.filter(input__submission_scope="cli").count() == 3 * args.lines
        assert OrmQ.objects.count() == args.lines
        each_line = ""
        if args.compare_each:
            with open(path, encoding="utf-8") as stream:
                report, each_s = timed(lambda: inputs_submit_stream(
                    stream=stream, fmt="jsonl", scope="cli-each", batch_size=args.batch_size, enqueue="each"))
            assert report.created == args.lines
            each_line = (f"  first run, one async_task per step : {args.lines / each_s:8.0f} inputs/s "
                         f"({each_s:.2f} s; bulk enqueue is {each_s / first_s:.2f}x faster)\n")
    finally:
        os.unlink(path)

    base_rate = args.lines / base_s
    print(f"bench/submit.py: {args.lines} lines, batch {args.batch_size}, PostgreSQL {connection.pg_version}, {args.broker} broker")
    print(f"  baseline: plain bulk_create of the rows: {base_rate:8.0f} rows/s   ({base_s:.2f} s)")
    print(f"  submit, first run (all new)          : {args.lines / first_s:8.0f} inputs/s ({first_s:.2f} s)"
          f"  = {args.lines / first_s / base_rate:.2f}x baseline  [aim >= 1000/s]")
    print(f"  submit, re-run (nothing new)         : {args.lines / again_s:8.0f} lines/s  ({again_s:.2f} s)"
          f"  = {args.lines / again_s / base_rate:.2f}x baseline  [aim >= 3000/s]")
    if each_line:
        print(each_line, end="")
    print("  each new input = 1 input row + 3 step runs + 1 queue row, one transaction per batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
