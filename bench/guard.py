"""Benchmark (not a test): what the idempotency guard costs on its happy path.

In one run, on SQLite (a temporary file database with the project's options: WAL, synchronous=NORMAL,
IMMEDIATE transactions) and on PostgreSQL (a scratch database it creates and drops), it measures:

  * baseline: a bare transaction that inserts one domain row (``tests.testapp.Receipt``), ops/s;
  * guarded:  ``guard.claim`` + ``guard.complete(write=<the same Receipt insert>)`` on a new key, ops/s;
  * the ratio guarded / baseline;
  * commits and database round trips per guarded op, counted by wrapping the connection (every
    COMMIT, BEGIN and statement; a statement run in autocommit mode counts as its own commit when
    it writes), and on PostgreSQL cross-checked with ``pg_stat_database.xact_commit``.

The two loops are interleaved in chunks of 100 operations over ``--rounds`` rounds of ``--n`` each,
so a burst of load from another process on the machine hurts both sides alike; the ratio is
total guarded rate / total bare rate, and the median of the per-chunk ratios is printed beside it.

    .venv/bin/python bench/guard.py [--n 2000] [--rounds 3] [--database-url postgres://postgres@127.0.0.1:5432/postgres]

Each database is measured in its own child process (Django reads its settings once per process);
the parent prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRATCH_DB = "pipeline_ops_bench_guard"


# --- child: measure one database ----------------------------------------------------------------


class Counter:
    """Counts what the guard sends to the database: statements, BEGINs, COMMITs and autocommit writes."""

    def __init__(self, connection):
        self.connection = connection
        self.statements = self.commits = self.autocommit_writes = self.begins = 0
        self._in_tx = False

    def __call__(self, execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("BEGIN"):
            self._in_tx = True  # SQLite's BEGIN IMMEDIATE goes through the cursor: already a statement
        elif self.connection.in_atomic_block:
            if not self._in_tx:
                self.begins += 1  # the driver sends BEGIN before the first statement of a transaction
                self._in_tx = True
        elif not sql.lstrip().upper().startswith(("SELECT", "SAVEPOINT", "RELEASE")):
            self.autocommit_writes += 1
        self.statements += 1
        return execute(sql, params, many, context)

    def committed(self):
        self.commits += 1
        self._in_tx = False

    def rolled_back(self):
        self._in_tx = False


def child(args) -> None:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction

    from idempotency import guard
    from idempotency.fingerprint import fingerprint
    from tests.testapp.models import Receipt

    call_command("migrate", verbosity=0)
    vendor = connection.vendor
    fp = fingerprint({"amount": 5})

    def bare(tag: str, i: int) -> None:
        with transaction.atomic():
            Receipt.objects.create(key=f"bare-{tag}-{i}", amount=5, attempt_number=1)

    def guarded(tag: str, i: int) -> None:
        key = f"guarded-{tag}-{i}"
        outcome = guard.claim(scope="bench", key=key, operation="charge", fingerprint=fp)
        attempt = outcome.attempt
        done = guard.complete(
            attempt=attempt, result={"receipt": key},
            write=lambda: Receipt.objects.create(key=key, amount=5, attempt_number=attempt.number),
        )
        assert not done.fenced

    def rate(fn, tag: str, n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            fn(tag, i)
        return n / (time.perf_counter() - start)

    # Warm up connections, caches and the query compiler.
    rate(bare, "warm", 50)
    rate(guarded, "warm", 50)

    # Count commits and round trips on a separate, small sample.
    counter = Counter(connection)
    connection.ensure_connection()
    real_commit, real_rollback = connection.commit, connection.rollback
    connection.commit = lambda: (counter.committed(), real_commit())[1]
    connection.rollback = lambda: (counter.rolled_back(), real_rollback())[1]
    xact_before = _xact_commits(connection) if vendor == "postgresql" else None
    sample = 200
    with connection.execute_wrapper(counter):
        rate(guarded, "count", sample)
    xact_after = _xact_commits(connection) if vendor == "postgresql" else None
    connection.commit, connection.rollback = real_commit, real_rollback

    # Interleave in small chunks so load from other processes on the machine hits both sides alike.
    chunk = min(100, args.n)
    bare_time = guarded_time = 0.0
    ratios = []
    done = 0
    for r in range(args.rounds):
        for c in range(max(1, args.n // chunk)):
            b = chunk / rate(bare, f"r{r}c{c}", chunk)
            g = chunk / rate(guarded, f"r{r}c{c}", chunk)
            bare_time, guarded_time = bare_time + b, guarded_time + g
            ratios.append(b / g)
            done += chunk
    ratios.sort()

    print(json.dumps({
        "vendor": vendor,
        "bare_ops": done / bare_time,
        "guarded_ops": done / guarded_time,
        "median_chunk_ratio": ratios[len(ratios) // 2],
        "commits_per_op": (counter.commits + counter.autocommit_writes) / sample,
        "round_trips_per_op": (counter.statements + counter.begins + counter.commits) / sample,
        "statements_per_op": counter.statements / sample,
        # The two stats queries are transactions too: subtract them.
        "pg_xact_commit_per_op": None if xact_before is None else (xact_after - xact_before - 2) / sample,
    }))


def _xact_commits(connection) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        return cursor.fetchone()[0]


# --- parent: one child per database, then the table ------------------------------------------------


def run_child(database_url: str, args) -> dict:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "tests.settings",  # adds tests.testapp (the Receipt domain model)
        "PYTHONPATH": str(ROOT),
        "CONN_MAX_AGE": "600",
    }
    done = subprocess.run(
        [sys.executable, __file__, "--child", "--n", str(args.n), "--rounds", str(args.rounds)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed on {database_url}:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="Operations per measured loop (default 2000).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of --n operations per side, interleaved in chunks of 100.")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL server to create the scratch database on.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 1 or args.rounds < 1:
        parser.error("--n and --rounds must be at least 1")
    if args.child:
        child(args)
        return 0

    import dj_database_url
    import psycopg

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp:
        results.append(run_child(f"sqlite:///{tmp}/bench.sqlite3", args))

    server = dj_database_url.parse(args.database_url)
    admin = dict(host=server["HOST"] or "127.0.0.1", port=server["PORT"] or 5432, user=server["USER"] or "postgres",
                 password=server["PASSWORD"] or None, dbname=server["NAME"] or "postgres")
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{SCRATCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{SCRATCH_DB}"')
    try:
        results.append(run_child(args.database_url.rsplit("/", 1)[0] + f"/{SCRATCH_DB}", args))
    finally:
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{SCRATCH_DB}" WITH (FORCE)')

    print(f"bench/guard.py: {args.rounds} rounds x {args.n} operations per side, interleaved in chunks of 100")
    print(f"{'database':<11}{'bare tx ops/s':>15}{'guarded ops/s':>15}{'ratio':>8}{'median chunk ratio':>20}"
          f"{'commits/op':>12}{'round trips/op':>16}{'pg xact_commit/op':>19}")
    worst = 0.0
    for r in results:
        ratio = r["guarded_ops"] / r["bare_ops"]
        pg = "-" if r["pg_xact_commit_per_op"] is None else f"{r['pg_xact_commit_per_op']:.3f}"
        print(f"{r['vendor']:<11}{r['bare_ops']:>15.0f}{r['guarded_ops']:>15.0f}{ratio:>8.2f}{r['median_chunk_ratio']:>20.2f}"
              f"{r['commits_per_op']:>12.2f}{r['round_trips_per_op']:>16.2f}{pg:>19}")
        worst = max(worst, r["commits_per_op"], r["pg_xact_commit_per_op"] or 0)
    # pg_stat_database also counts the odd autovacuum/statistics transaction: allow a hair of noise.
    ok = worst <= 2.0 + 0.02
    print("happy path commits per guarded op: " + ("OK (at most 2)" if ok else f"TOO MANY ({worst:.3f})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
