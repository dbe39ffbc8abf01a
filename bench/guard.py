"""Benchmark (not a test): what the idempotency guard costs on its happy path, against the best
one-commit alternative and against the physical cap of any two-commit operation, in one run.

On SQLite (a temporary file database with the project's options: WAL, synchronous=NORMAL,
IMMEDIATE transactions) and on PostgreSQL (a scratch database ``benchwt_guard_<pid>`` it creates
and drops), it measures three sides, ``--n`` operations each per round, interleaved
(the order rotates every round: A B C, B C A, C A B, ...) over ``--rounds`` rounds (at least 3):

  * bare-one-commit: what an application writes without the guard, at its best: the domain row
    (``tests.testapp.Receipt``) inserted with the ORM in autocommit, one statement, one commit
    (a ``transaction.atomic()`` around one INSERT would only add BEGIN and COMMIT round trips);
  * guarded: ``guard.claim`` on a new key + ``guard.complete(write=<the same Receipt insert>)``;
  * two-commit-cap: the physical cap of any durable two-commit operation, as a plain loop on the
    same connection (Django's own driver connection, so the same connection settings), no ORM:
    ``INSERT ... RETURNING id`` and commit, then ``UPDATE ... WHERE id`` and commit (autocommit,
    one round trip each).

It reports the median of each side's per-round rate and the median of the per-round ratios, and
counts commits and round trips per guarded op (wrapping the connection: every COMMIT, BEGIN and
statement; a write in autocommit counts as its own commit), cross-checked on PostgreSQL with
``pg_stat_database.xact_commit``. Each database is measured in its own child process (Django reads
its settings once per process); the parent prints the settings, the table, then one line per
figure: ``RATIO guard.pg.guarded/two-commit-cap <v>``, ``RATIO guard.<db>.guarded/bare-one-commit <v>``
(db: pg, sqlite) and, for reference, ``RATIO guard.pg.two-commit-cap/bare-one-commit <v>``.
With ``--clients N`` (N > 1) N forked client processes run each side together, started at a
barrier, a side's rate being all their operations over the wall time from the first start to the
last end; the names then read ``guard.pg-Nclients....``.

    .venv/bin/python bench/guard.py [--n 500] [--rounds 9] [--clients 1] [--only sqlite,pg]
        [--database-url postgres://postgres@127.0.0.1:5432/postgres]

On SQLite with synchronous=NORMAL a commit does not wait for a flush: the raw two-commit loop there
measures a Python loop without the ORM (about 5x the ORM's one-commit insert), not a physical cap,
so it is shown in the table but gives no RATIO line.
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

from bench.rounds import (  # noqa: E402
    median, order, per_round_ratios, print_command, print_ratios, print_settings, rounds_type,
)

SIDES = ("bare-one-commit", "guarded", "two-commit-cap")
CAP_TABLE = "bench_two_commit"


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


def make_sides(tag: str) -> dict:
    """The three sides on this process's Django connection; ``tag`` keeps keys apart between clients."""
    from django.db import connection

    from idempotency import guard
    from idempotency.fingerprint import fingerprint
    from tests.testapp.models import Receipt

    fp = fingerprint({"amount": 5})
    connection.ensure_connection()
    raw = connection.connection  # the driver's connection Django uses, in autocommit here
    mark = "%s" if connection.vendor == "postgresql" else "?"
    insert_sql = f"INSERT INTO {CAP_TABLE} (key, status) VALUES ({mark}, 0) RETURNING id"
    update_sql = f"UPDATE {CAP_TABLE} SET status = 1 WHERE id = {mark}"
    cap_cursor = raw.cursor()

    def bare(r: str, i: int) -> None:
        Receipt.objects.create(key=f"bare-{tag}-{r}-{i}", amount=5, attempt_number=1)

    def guarded(r: str, i: int) -> None:
        key = f"guarded-{tag}-{r}-{i}"
        outcome = guard.claim(scope="bench", key=key, operation="charge", fingerprint=fp)
        attempt = outcome.attempt
        done = guard.complete(
            attempt=attempt, result={"receipt": key},
            write=lambda: Receipt.objects.create(key=key, amount=5, attempt_number=attempt.number),
        )
        assert not done.fenced

    def two_commit(r: str, i: int) -> None:
        # Autocommit: each statement is its own transaction, committed (and on PostgreSQL flushed)
        # before the server answers.
        cap_cursor.execute(insert_sql, (f"cap-{tag}-{r}-{i}",))
        row_id = cap_cursor.fetchone()[0]
        cap_cursor.execute(update_sql, (row_id,))

    assert connection.get_autocommit() and not connection.in_atomic_block
    return {"bare-one-commit": bare, "guarded": guarded, "two-commit-cap": two_commit}


def timed(fn, r: str, n: int) -> tuple[float, float]:
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable between processes
    for i in range(n):
        fn(r, i)
    return start, time.perf_counter()


def client_loop(index: int, args, barrier, results) -> None:
    """One of ``--clients`` forked clients: every side starts at a barrier, all clients together."""
    from django.db import connection

    sides = make_sides(f"c{index}")
    for fn in sides.values():
        timed(fn, "warm", 20)
    spans = []
    for r in range(args.rounds):
        for name in order(SIDES, r):
            barrier.wait()
            spans.append((r, name, *timed(sides[name], f"r{r}", args.n)))
    connection.close()
    results.put(spans)


def child(args) -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection, connections

    call_command("migrate", verbosity=0)
    vendor = connection.vendor
    with connection.cursor() as cursor:
        pk = "BIGSERIAL PRIMARY KEY" if vendor == "postgresql" else "INTEGER PRIMARY KEY AUTOINCREMENT"
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {CAP_TABLE} (id {pk}, key VARCHAR(255) NOT NULL UNIQUE, "
                       f"status SMALLINT NOT NULL)")

    sides = make_sides("main")
    raw = connection.connection

    def rate(fn, r: str, n: int) -> float:
        start, end = timed(fn, r, n)
        return n / (end - start)

    # Warm up connections, caches and the query compiler.
    for fn in sides.values():
        rate(fn, "warm", 50)

    # Count commits and round trips on a separate, small sample.
    guarded = sides["guarded"]
    counter = Counter(connection)
    real_commit, real_rollback = connection.commit, connection.rollback
    connection.commit = lambda: (counter.committed(), real_commit())[1]
    connection.rollback = lambda: (counter.rolled_back(), real_rollback())[1]
    xact_before = _xact_commits(connection) if vendor == "postgresql" else None
    sample = 200
    with connection.execute_wrapper(counter):
        rate(guarded, "count", sample)
    xact_after = _xact_commits(connection) if vendor == "postgresql" else None
    connection.commit, connection.rollback = real_commit, real_rollback

    per_round = {name: [] for name in SIDES}
    if args.clients == 1:
        for r in range(args.rounds):
            for name in order(SIDES, r):
                per_round[name].append(rate(sides[name], f"r{r}", args.n))
    else:
        import multiprocessing

        connections.close_all()  # each forked client opens its own connection
        ctx = multiprocessing.get_context("fork")
        barrier, results = ctx.Barrier(args.clients), ctx.Queue()
        procs = [ctx.Process(target=client_loop, args=(i, args, barrier, results)) for i in range(args.clients)]
        for proc in procs:
            proc.start()
        spans = [span for _ in procs for span in results.get(timeout=3600)]
        for proc in procs:
            proc.join()
            if proc.exitcode:
                raise SystemExit(f"a client exited with {proc.exitcode}")
        # A side's rate in a round: all clients' operations over the wall time from the first
        # client's start to the last client's end.
        for r in range(args.rounds):
            for name in SIDES:
                mine = [(start, end) for rr, nn, start, end in spans if rr == r and nn == name]
                wall = max(e for _, e in mine) - min(s for s, _ in mine)
                per_round[name].append(args.clients * args.n / wall)

    db = settings.DATABASES["default"]
    described = {"ENGINE": db["ENGINE"], "CONN_MAX_AGE": db.get("CONN_MAX_AGE"),
                 "CONN_HEALTH_CHECKS": db.get("CONN_HEALTH_CHECKS"), "OPTIONS": db.get("OPTIONS") or {}}
    if vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('server_version'), current_setting('fsync'), "
                           "current_setting('synchronous_commit'), current_setting('wal_sync_method')")
            version, fsync, sync_commit, wal_sync = cursor.fetchone()
        described["server"] = f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync_commit}, wal_sync_method={wal_sync}"
    else:
        import sqlite3

        described["server"] = f"SQLite {sqlite3.sqlite_version}"
    connection.ensure_connection()
    raw = connection.connection
    described["driver"] = f"{type(raw).__module__}.{type(raw).__name__}, cursor {type(raw.cursor()).__name__}"
    described["IDEMPOTENCY"] = dict(settings.IDEMPOTENCY)

    print(json.dumps({
        "vendor": vendor,
        "settings": described,
        "per_round": per_round,
        "commits_per_op": (counter.commits + counter.autocommit_writes) / sample,
        "round_trips_per_op": (counter.statements + counter.begins + counter.commits) / sample,
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
        [sys.executable, __file__, "--child", "--n", str(args.n), "--rounds", str(args.rounds), "--clients", str(args.clients)],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed on {database_url}:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="Operations per side per round (default 500).")
    parser.add_argument("--rounds", type=rounds_type, default=9,
                        help="Interleaved rounds, at least 3 (default 9); figures are medians of the rounds.")
    parser.add_argument("--clients", type=int, default=1,
                        help="Client processes running each side together, started at a barrier (default 1).")
    parser.add_argument("--only", default="sqlite,pg", help="Comma-separated databases to measure: sqlite, pg.")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL server to create the scratch database on.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 1 or args.clients < 1:
        parser.error("--n and --clients must be at least 1")
    if args.child:
        child(args)
        return 0
    wanted = [d.strip() for d in args.only.split(",") if d.strip()]
    if not wanted or set(wanted) - {"sqlite", "pg"}:
        parser.error("--only takes sqlite, pg or both")

    from bench.scratch import scratch_database

    results = {}
    if "sqlite" in wanted:
        with tempfile.TemporaryDirectory(prefix="benchwt-guard-") as tmp:
            results["sqlite"] = run_child(f"sqlite:///{tmp}/bench.sqlite3", args)
    if "pg" in wanted:
        with scratch_database(args.database_url, name=f"benchwt_guard_{os.getpid()}", script="bench/guard.py") as url:
            results["pg"] = run_child(url, args)

    print_command(f"bench/guard.py: {args.rounds} interleaved rounds x {args.n} operations per side "
                  f"(order rotates: {', '.join(SIDES)}), {args.clients} client(s)"
                  + (" started together at a barrier; a side's rate is all clients' ops over the wall time" if args.clients > 1 else ""))
    for db, r in results.items():
        print_settings(f"{db}, all sides (one Django connection)", r["settings"])
        print_settings(f"{db}, sides", {
            "bare-one-commit": "Receipt.objects.create() in autocommit: 1 INSERT, 1 commit",
            "guarded": "guard.claim(new key) + guard.complete(write=Receipt.objects.create())",
            "two-commit-cap": f"raw driver cursor, autocommit: INSERT INTO {CAP_TABLE} ... RETURNING id; "
                              f"UPDATE {CAP_TABLE} SET status = 1 WHERE id = ...",
        })

    print()
    print("ops/s are medians of the per-round rates; ratios are medians of the per-round ratios")
    print(f"{'database':<9}{'bare ops/s':>12}{'guarded ops/s':>15}{'2-commit cap':>14}{'g/cap':>8}{'g/bare':>8}"
          f"{'cap/bare':>10}{'commits/op':>12}{'round trips/op':>16}{'pg xact_commit/op':>19}")
    ratios = {}
    worst = 0.0
    for db, r in results.items():
        rounds = r["per_round"]
        bare, guarded, cap = rounds["bare-one-commit"], rounds["guarded"], rounds["two-commit-cap"]
        g_cap = median(per_round_ratios(guarded, cap))
        g_bare = median(per_round_ratios(guarded, bare))
        cap_bare = median(per_round_ratios(cap, bare))
        pg = "-" if r["pg_xact_commit_per_op"] is None else f"{r['pg_xact_commit_per_op']:.3f}"
        print(f"{db:<9}{median(bare):>12.0f}{median(guarded):>15.0f}{median(cap):>14.0f}{g_cap:>8.2f}{g_bare:>8.2f}"
              f"{cap_bare:>10.2f}{r['commits_per_op']:>12.2f}{r['round_trips_per_op']:>16.2f}{pg:>19}")
        name = db if args.clients == 1 else f"{db}-{args.clients}clients"
        if db == "pg":
            ratios[f"guard.{name}.guarded/two-commit-cap"] = g_cap
        ratios[f"guard.{name}.guarded/bare-one-commit"] = g_bare
        if db == "pg":
            ratios[f"guard.{name}.two-commit-cap/bare-one-commit"] = cap_bare
        worst = max(worst, r["commits_per_op"], r["pg_xact_commit_per_op"] or 0)
    for db, r in results.items():
        for side in SIDES:
            print(f"  {db} {side} per round: {', '.join(f'{v:.0f}' for v in r['per_round'][side])}")
    # pg_stat_database also counts the odd autovacuum/statistics transaction: allow a hair of noise.
    ok = worst <= 2.0 + 0.02
    print("happy path commits per guarded op: " + ("OK (at most 2)" if ok else f"TOO MANY ({worst:.3f})"))
    if "sqlite" in results:
        print("sqlite: no guarded/two-commit-cap figure. With synchronous=NORMAL a SQLite commit waits for no flush,\n"
              "so the raw two-commit loop measures the ORM-free Python loop, not a physical cap (see the table).")
    print_ratios(ratios)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
