#!/usr/bin/env python
"""Guarded pipeline steps per second against bare django-q2 tasks per second, through real workers.

Not a test: a benchmark that prints ratios against a baseline measured in the same run, on the
same broker, database and cluster:

* **guarded**: ``input_submit`` of N inputs to a bench-only pipeline of three no-op steps
  (``bench/pipeline_throughput_settings.py``; the product's PIPELINES are untouched). Every step
  runs through the product: ``step_run_execute_task`` -> guard claim -> no-op -> complete with the
  StepOutput and the next step's enqueue in one transaction, status roll-up.
* **bare**: N chains of three plain django-q2 no-op tasks (each enqueues the next), i.e. the same
  shape with nothing but django-q2's own delivery. The product runs django-q2 with
  ``save_limit=-1`` (no Task row per success), so a chain's last task inserts one marker row
  (``bench_bare_done``, a scratch table) for the bench to see it finish: one write per chain,
  where the guarded side writes a StepOutput per step.

For each of SQLite+ORM, PostgreSQL+ORM and PostgreSQL+Redis it creates a scratch database (a
temporary SQLite file; ``bench_pipeline_throughput_<pid>`` on PostgreSQL), migrates it, starts one
``qcluster`` with ``--workers`` workers, runs a warm-up, then ``--rounds`` rounds of bare and
guarded (alternating order), and drops the database. Usage:

    .venv/bin/python bench/pipeline_throughput.py [--inputs 200] [--workers 4] [--rounds 2]
        [--only sqlite-orm,pg-orm,pg-redis] [--pg-url postgres://postgres@127.0.0.1:5432/postgres]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CONFIGS = ("sqlite-orm", "pg-orm", "pg-redis")


# --- child: one configuration, inside Django ---------------------------------------------------


def child(label: str, inputs: int, rounds: int) -> dict:
    import django

    sys.path.insert(0, str(ROOT))
    django.setup()
    from django.core.management import call_command
    from django.db import close_old_connections, connection
    from django_q.brokers import get_broker
    from django_q.tasks import async_task

    from pipeline_ops.chaos.cluster import QCluster, base_env
    from pipeline_ops.models import StepRun
    from pipeline_ops.services.inputs import input_submit
    from pipeline_ops.states import StepStatus

    call_command("migrate", verbosity=0, interactive=False)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS bench_bare_done (chain VARCHAR(64) NOT NULL)")
    broker = get_broker()
    broker.purge_queue()
    steps = 3

    def wait(count, target: int, timeout: float = 600.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            close_old_connections()
            if count() >= target:
                return time.monotonic()
            time.sleep(0.02)
        raise RuntimeError(f"{label}: only {count()} of {target} done after {timeout:.0f}s")

    def chains_done(group: str) -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM bench_bare_done WHERE chain = %s", [group])
            return cursor.fetchone()[0]

    def bare(n: int) -> float:
        group = f"bench_bare_{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        for i in range(n):
            async_task("pipeline_throughput_settings.bare_noop", i, 0, group, broker=broker)
        done = wait(lambda: chains_done(group), n)
        return n * steps / (done - started)

    def guarded(n: int) -> float:
        scope = f"bench:{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        for i in range(n):
            input_submit(pipeline="bench_noop", payload={"text": "x"}, scope=scope, key=str(i))
        done = wait(
            lambda: StepRun.objects.filter(input__submission_scope=scope, status=StepStatus.SUCCEEDED).count(), n * steps
        )
        return n * steps / (done - started)

    cluster = QCluster(env=base_env(), name=f"bench-{label}", log_path=Path(tempfile.gettempdir()) / f"bench-{label}.log")
    cluster.start(wait=True, timeout=120)
    results = {"bare": [], "guarded": []}
    try:
        bare(10)
        guarded(10)  # warm-up: workers import the modules, connections open
        for r in range(rounds):
            order = ("bare", "guarded") if r % 2 == 0 else ("guarded", "bare")
            for kind in order:
                results[kind].append(round((bare if kind == "bare" else guarded)(inputs), 1))
    finally:
        cluster.terminate(timeout=30)
    bare_rate, guarded_rate = statistics.median(results["bare"]), statistics.median(results["guarded"])
    return {
        "config": label, "inputs": inputs, "steps": inputs * steps, "workers": cluster.workers_expected,
        "bare_per_s": results["bare"], "guarded_per_s": results["guarded"],
        "bare_median": round(bare_rate, 1), "guarded_median": round(guarded_rate, 1), "ratio": round(guarded_rate / bare_rate, 2),
    }


# --- parent: scratch databases, one child per configuration ------------------------------------


def _pg_admin(url: str, sql: str) -> None:
    import dj_database_url
    import psycopg

    cfg = dj_database_url.parse(url)
    with psycopg.connect(host=cfg["HOST"], port=cfg["PORT"] or 5432, user=cfg["USER"], password=cfg["PASSWORD"] or None,
                         dbname=cfg["NAME"], autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=200, help="inputs per round (3 steps each; default 200)")
    parser.add_argument("--workers", type=int, default=4, help="qcluster workers (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of bare + guarded per configuration (default 2)")
    parser.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
                        help="PostgreSQL server (its maintenance database) where scratch databases are created")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.inputs, args.rounds)))
        return 0
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(wanted) - set(CONFIGS)
    if unknown or args.inputs < 1 or args.workers < 1 or args.rounds < 1:
        parser.error(f"bad arguments (unknown configs: {', '.join(sorted(unknown)) or 'none'})")

    tag = f"{os.getpid()}"
    pg_db = f"bench_pipeline_throughput_{tag}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    results = []
    pg_created = False
    try:
        for label in wanted:
            if label.startswith("pg") and not pg_created:
                _pg_admin(args.pg_url, f'CREATE DATABASE "{pg_db}"')
                pg_created = True
            env = {
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "pipeline_throughput_settings",
                "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "DATABASE_URL": f"sqlite:///{tmp / 'bench.sqlite3'}" if label == "sqlite-orm" else _with_db(args.pg_url, pg_db),
                "PIPELINE_OPS_BROKER": "redis" if label.endswith("redis") else "orm",
                "PIPELINE_OPS_QUEUE": f"bench_pipeline_{label}_{tag}",
                "REDIS_URL": args.redis_url,
                "Q_WORKERS": str(args.workers),
                "Q_LOG_LEVEL": "ERROR",
                "LOG_LEVEL": "ERROR",
                "PIPELINE_OPS_VAR_DIR": str(tmp),
            }
            print(f"[{label}] {args.rounds} round(s) of {args.inputs} inputs x 3 no-op steps, {args.workers} workers ...",
                  file=sys.stderr, flush=True)
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", label, "--inputs", str(args.inputs),
                 "--rounds", str(args.rounds)],
                cwd=ROOT, env=env, capture_output=True, text=True, check=False,
            )
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return proc.returncode
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        if pg_created:
            _pg_admin(args.pg_url, f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)')
        for path in sorted(tmp.glob("**/*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        tmp.rmdir()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'config':<12} {'bare tasks/s':>14} {'guarded steps/s':>16} {'ratio':>7}   (per round: bare | guarded)")
    for r in results:
        print(f"{r['config']:<12} {r['bare_median']:>14} {r['guarded_median']:>16} {r['ratio']:>6}x   "
              f"{r['bare_per_s']} | {r['guarded_per_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
