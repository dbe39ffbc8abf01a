#!/usr/bin/env python
"""Guarded pipeline steps per second against bare django-q2 tasks per second, through real workers.

Not a test: a benchmark that prints ratios against baselines measured in the same run, on the same
broker and database, interleaved round by round. Three sides per configuration:

* **guarded**: ``input_submit`` of N inputs to a bench-only pipeline of three no-op steps
  (``bench/pipeline_throughput_settings.py``; the product's PIPELINES are untouched). Every step
  runs through the product: ``step_run_execute_task`` -> guard claim -> no-op -> complete with the
  StepOutput and the next step's enqueue, status roll-up. The product's settings.
* **bare-same-settings**: N chains of three plain django-q2 no-op tasks (each enqueues the next),
  i.e. the same shape with nothing but django-q2's own delivery, at the product's own django-q2
  and database settings. Every enqueue, the driver's and the tasks', reuses one broker per process
  (``broker=``): without it ``async_task`` builds a new broker, a new Redis client, per enqueue.
  A chain's last task inserts one marker row (``bench_bare_done``) for the bench to see it finish:
  one write per chain, where the guarded side writes a StepOutput per step.
* **bare-tuned**: the same chains on the best honest django-q2 (``--tuned``, by default bulk 4,
  queue_limit = workers, poll 0.05 s, save_limit -1, CONN_HEALTH_CHECKS off), set through
  ``BENCH_Q_CLUSTER`` / ``BENCH_CONN_HEALTH_CHECKS`` for that variant's own processes.

For each configuration of ``CONFIGS`` (``--only`` selects) it creates a scratch database (a temporary
SQLite file; ``benchwt_pipeline_<pid>`` on PostgreSQL) and starts two drivers, each a process with
its own settings, its own ``qcluster`` (``--workers`` workers) and its own queue
(``bench_wt_<pid>_<config>_<variant>``): the product's settings (guarded and bare-same-settings)
and the tuned ones (bare-tuned). After a warm-up it runs ``--rounds`` rounds (at least 3) of the
three sides, the order rotating each round, one side at a time (the other cluster sits idle), and
reports the median rate of each side and the median of the per-round ratios, then one line per
figure: ``RATIO pipeline.<config>.guarded/bare-same-settings <v>``,
``RATIO pipeline.<config>.guarded/bare-tuned <v>`` and, for reference,
``RATIO pipeline.<config>.bare-tuned/bare-same-settings <v>``. Usage:

    .venv/bin/python bench/pipeline_throughput.py [--inputs 200] [--workers 4] [--rounds 5]
        [--only sqlite-orm,pg-orm,pg-redis] [--pg-url postgres://postgres@127.0.0.1:5432/postgres]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from bench.rounds import (  # noqa: E402
    median, order, per_round_ratios, print_command, print_ratios, print_settings, rounds_type,
)


@dataclass(frozen=True)
class Config:
    database: str  # "sqlite" (a temporary file) or "pg" (a scratch database on --pg-url)
    broker: str  # PIPELINE_OPS_BROKER
    tuned_broker: str | None = None  # bare-tuned's broker, when not the same (None: ``broker``)


CONFIGS = {
    "sqlite-orm": Config("sqlite", "orm"),
    "pg-orm": Config("pg", "orm"),
    "pg-redis": Config("pg", "redis"),
    # The product's PostgreSQL broker; its bare-tuned side is stock django-q2 on its own ORM broker,
    # tuned: issue 11's "guarded on this broker / bare django-q2 ORM, both tuned" in one run.
    "pg-postgres": Config("pg", "postgres", tuned_broker="orm"),
}
SIDES = ("bare-same-settings", "guarded", "bare-tuned")
# Which driver runs which side: the product's settings, or the tuned bare django-q2.
VARIANT_OF = {"guarded": "project", "bare-same-settings": "project", "bare-tuned": "tuned"}
STEPS = 3
PREFIX = "@@bench "  # the drivers' answers on stdout; anything else there is ignored


def tuned_q_cluster(workers: int) -> dict:
    """The best honest django-q2 for no-op tasks (shared/reference/django-q2.md, "safe" column):
    the prefetch rule queue_limit = workers and bulk <= workers still holds."""
    return {"bulk": min(4, workers), "queue_limit": workers, "poll": 0.05, "save_limit": -1}


# --- driver: one variant's settings, its cluster, inside Django ----------------------------------


def driver(label: str, variant: str, migrate: bool) -> int:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import close_old_connections, connection
    from django_q.brokers import get_broker
    from django_q.tasks import async_task

    from pipeline_ops.chaos.cluster import QCluster, base_env
    from pipeline_ops.models import StepRun
    from pipeline_ops.services.inputs import input_submit
    from pipeline_ops.states import StepStatus

    if migrate:
        call_command("migrate", verbosity=0, interactive=False)
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS bench_bare_done (chain VARCHAR(64) NOT NULL)")
    broker = get_broker()  # one per process, reused by every enqueue of the bare side
    broker.purge_queue()

    def answer(obj: dict) -> None:
        sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
        sys.stdout.flush()

    def wait(count, target: int, timeout: float = 600.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            close_old_connections()
            if count() >= target:
                return time.monotonic()
            time.sleep(0.02)
        raise RuntimeError(f"{label}/{variant}: only {count()} of {target} done after {timeout:.0f}s")

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
        return n * STEPS / (done - started)

    def guarded(n: int) -> float:
        scope = f"bench:{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        for i in range(n):
            input_submit(pipeline="bench_noop", payload={"text": "x"}, scope=scope, key=str(i))
        done = wait(
            lambda: StepRun.objects.filter(input__submission_scope=scope, status=StepStatus.SUCCEEDED).count(), n * STEPS
        )
        return n * STEPS / (done - started)

    cluster = QCluster(env=base_env(), name=f"bench-{label}-{variant}",
                       log_path=Path(os.environ["PIPELINE_OPS_VAR_DIR"]) / f"cluster-{label}-{variant}.log")
    cluster.start(wait=True, timeout=120)
    try:
        # Warm-up: workers import the modules, connections open.
        bare(10)
        if variant == "project":
            guarded(10)
        db = settings.DATABASES["default"]
        answer({"ready": True, "settings": {
            "DJANGO_SETTINGS_MODULE": os.environ["DJANGO_SETTINGS_MODULE"],
            "BENCH_Q_CLUSTER": os.environ.get("BENCH_Q_CLUSTER", "(unset: the product's Q_CLUSTER)"),
            "BENCH_CONN_HEALTH_CHECKS": os.environ.get("BENCH_CONN_HEALTH_CHECKS", "(unset)"),
            "Q_CLUSTER": {k: v for k, v in settings.Q_CLUSTER.items() if k not in ("label",)},
            "broker": f"{type(broker).__module__}.{type(broker).__name__}, list_key {broker.list_key}",
            "database": {"ENGINE": db["ENGINE"], "NAME": db["NAME"], "CONN_MAX_AGE": db.get("CONN_MAX_AGE"),
                         "CONN_HEALTH_CHECKS": db.get("CONN_HEALTH_CHECKS"), "OPTIONS": db.get("OPTIONS") or {}},
            "qcluster": f"1 cluster, {cluster.workers_expected} workers",
        }})
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            kind, n = command[0], int(command[1])
            answer({"rate": round((bare if kind == "bare" else guarded)(n), 1)})
    finally:
        broker.purge_queue()
        cluster.terminate(timeout=30)
    return 0


# --- parent: scratch databases, two drivers per configuration, the rounds -----------------------


class Driver:
    def __init__(self, label: str, variant: str, env: dict, migrate: bool, log_dir: Path):
        self.label, self.variant = label, variant
        self.stderr_path = log_dir / f"driver-{label}-{variant}.err"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in close()
        args = [sys.executable, str(Path(__file__).resolve()), "--driver", label, "--variant", variant]
        self.proc = subprocess.Popen(args + (["--migrate"] if migrate else []), cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        self.proc.wait()
        tail = self.stderr_path.read_text()[-4000:]
        cluster_log = self.stderr_path.parent / f"cluster-{self.label}-{self.variant}.log"
        if cluster_log.exists():
            tail += f"\n--- {cluster_log.name}:\n" + cluster_log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"driver {self.label}/{self.variant} exited with {self.proc.returncode}:\n{tail}")

    def run(self, kind: str, n: int) -> float:
        self.proc.stdin.write(f"{kind} {n}\n")
        self.proc.stdin.flush()
        return self.read()["rate"]

    def close(self) -> None:
        """End of stdin is the driver's "quit": it stops its cluster with SIGTERM (graceful)."""
        try:
            if self.proc.poll() is None:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def measure(label: str, envs: dict[str, dict], args, log_dir: Path) -> dict:
    drivers: dict[str, Driver] = {}
    try:
        settings = {}
        # One at a time: the first migrates, the second finds the tables there.
        for variant, env in envs.items():
            drivers[variant] = Driver(label, variant, env, migrate=not drivers, log_dir=log_dir)
            settings[variant] = drivers[variant].read()["settings"]
        per_round = {side: [] for side in SIDES}
        for r in range(args.rounds):
            for side in order(SIDES, r):
                kind = "guarded" if side == "guarded" else "bare"
                per_round[side].append(drivers[VARIANT_OF[side]].run(kind, args.inputs))
            print(f"[{label}] round {r + 1}/{args.rounds}: "
                  + ", ".join(f"{s} {per_round[s][-1]}" for s in SIDES), file=sys.stderr, flush=True)
        return {"config": label, "settings": settings, "per_round": per_round}
    finally:
        for d in drivers.values():
            d.close()


def _pg_admin(url: str, sql: str) -> None:
    import dj_database_url
    import psycopg

    cfg = dj_database_url.parse(url)
    with psycopg.connect(host=cfg["HOST"] or "127.0.0.1", port=cfg["PORT"] or 5432, user=cfg["USER"] or "postgres",
                         password=cfg["PASSWORD"] or None, dbname=cfg["NAME"] or "postgres", autocommit=True,
                         connect_timeout=5) as conn:
        conn.execute(sql)


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=200, help="inputs (chains) per side per round, 3 steps each (default 200)")
    parser.add_argument("--workers", type=int, default=4, help="qcluster workers (default 4)")
    parser.add_argument("--rounds", type=rounds_type, default=5, help="interleaved rounds, at least 3 (default 5)")
    parser.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--tuned", default=None,
                        help="JSON Q_CLUSTER keys of bare-tuned (default: bulk 4, queue_limit = workers, poll 0.05, save_limit -1)")
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
                        help="PostgreSQL server (its maintenance database) where scratch databases are created")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--migrate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        sys.path.insert(0, str(BENCH_DIR))
        return driver(args.driver, args.variant, args.migrate)
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(wanted) - set(CONFIGS)
    if unknown or not wanted or args.inputs < 1 or args.workers < 1:
        parser.error(f"bad arguments (unknown configs: {', '.join(sorted(unknown)) or 'none'})")
    tuned = json.loads(args.tuned) if args.tuned else tuned_q_cluster(args.workers)

    print_command(f"bench/pipeline_throughput.py: {args.rounds} interleaved rounds (order rotates: {', '.join(SIDES)}) "
                  f"x {args.inputs} inputs x {STEPS} no-op steps per side, {args.workers} workers, {os.cpu_count()} CPUs")
    tag = f"{os.getpid()}"
    pg_db = f"benchwt_pipeline_{tag}"
    tmp = Path(tempfile.mkdtemp(prefix="benchwt-pipeline-"))
    results = []
    pg_created = False
    try:
        for label in wanted:
            config = CONFIGS[label]
            if config.database == "pg" and not pg_created:
                _pg_admin(args.pg_url, f'CREATE DATABASE "{pg_db}"')
                pg_created = True
            common = {
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "pipeline_throughput_settings",
                "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "DATABASE_URL": f"sqlite:///{tmp / f'{label}.sqlite3'}" if config.database == "sqlite" else _with_db(args.pg_url, pg_db),
                "PIPELINE_OPS_BROKER": config.broker,
                "REDIS_URL": args.redis_url,
                "Q_WORKERS": str(args.workers),
                "Q_LOG_LEVEL": "ERROR",
                "LOG_LEVEL": "ERROR",
                "PIPELINE_OPS_VAR_DIR": str(tmp),
            }
            for name in ("BENCH_Q_CLUSTER", "BENCH_CONN_HEALTH_CHECKS"):
                common.pop(name, None)
            envs = {
                "project": {**common, "PIPELINE_OPS_QUEUE": f"bench_wt_{tag}_{label}_project"},
                "tuned": {**common, "PIPELINE_OPS_QUEUE": f"bench_wt_{tag}_{label}_tuned",
                          "PIPELINE_OPS_BROKER": config.tuned_broker or config.broker,
                          "BENCH_Q_CLUSTER": json.dumps(tuned), "BENCH_CONN_HEALTH_CHECKS": "0"},
            }
            print(f"[{label}] {args.rounds} rounds of {args.inputs} inputs x {STEPS} no-op steps per side, "
                  f"{args.workers} workers ...", file=sys.stderr, flush=True)
            result = measure(label, envs, args, tmp)
            results.append(result)
            for variant, sides in (("project", "guarded, bare-same-settings"), ("tuned", "bare-tuned")):
                print_settings(f"{label}: {sides}", result["settings"][variant])
            sys.stdout.flush()
    finally:
        if pg_created:
            _pg_admin(args.pg_url, f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)')
        for path in sorted(tmp.glob("**/*"), reverse=True):
            path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
        tmp.rmdir()

    print()
    print("steps (tasks)/s are medians of the per-round rates; ratios are medians of the per-round ratios")
    print(f"{'config':<12}{'bare-same/s':>13}{'bare-tuned/s':>14}{'guarded/s':>11}{'g/bare-same':>13}{'g/bare-tuned':>14}"
          f"{'tuned/same':>12}")
    ratios = {}
    for r in results:
        rounds, label = r["per_round"], r["config"]
        same, tuned_rates, guarded = rounds["bare-same-settings"], rounds["bare-tuned"], rounds["guarded"]
        g_same = median(per_round_ratios(guarded, same))
        g_tuned = median(per_round_ratios(guarded, tuned_rates))
        t_same = median(per_round_ratios(tuned_rates, same))
        print(f"{label:<12}{median(same):>13.1f}{median(tuned_rates):>14.1f}{median(guarded):>11.1f}{g_same:>13.2f}"
              f"{g_tuned:>14.2f}{t_same:>12.2f}")
        ratios[f"pipeline.{label}.guarded/bare-same-settings"] = g_same
        ratios[f"pipeline.{label}.guarded/bare-tuned"] = g_tuned
        ratios[f"pipeline.{label}.bare-tuned/bare-same-settings"] = t_same
    for r in results:
        for side in SIDES:
            print(f"  {r['config']} {side} per round: {', '.join(str(v) for v in r['per_round'][side])}")
    print_ratios(ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
