"""``manage.py chaos``: the incident replayed on real workers, and (``--naive``) its control group."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from pipeline_ops.chaos.brokers import BROKERS, queue_name_for
from pipeline_ops.chaos.cluster import BASE_DIR, ClusterError
from pipeline_ops.chaos.report import render
from pipeline_ops.chaos.scenario import ChaosConfig, run_guarded, run_naive, stderr_progress
from pipeline_ops.management.progress import progress_bar


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _rate(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(value)
    return number


def _ensure_database(url: str) -> None:
    """Create a PostgreSQL database named by ``url`` if it does not exist (SQLite files create themselves)."""
    import dj_database_url
    import psycopg

    cfg = dj_database_url.parse(url)
    if "postgresql" not in cfg["ENGINE"]:
        return
    try:
        with psycopg.connect(host=cfg["HOST"] or "127.0.0.1", port=cfg["PORT"] or 5432, user=cfg["USER"] or None,
                             password=cfg["PASSWORD"] or None, dbname="postgres", autocommit=True, connect_timeout=5) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [cfg["NAME"]]).fetchone():
                conn.execute(f'CREATE DATABASE "{cfg["NAME"]}"')
    except psycopg.Error as exc:
        raise CommandError(f"cannot reach or create {cfg['NAME']} on {cfg['HOST']}: {exc}".splitlines()[0]) from exc


class Command(BaseCommand):
    help = (
        "Replay the incident: start the fault-injecting model server and N real qcluster processes, "
        "submit M inputs to the 'llm' pipeline, inject stalls past the client timeout, 5xx, 429, "
        "duplicate enqueues, a busy worker SIGKILL and a whole-cluster SIGKILL + restart, run the "
        "reconciler, wait until every input is terminal, run verify_integrity and print a summary. "
        "--db-faults (PostgreSQL) also terminates the workers' database backends at random moments and "
        "gives their sessions a short lock_timeout. Duplicates are counted from an effects log with no "
        "unique constraint. Exit 0 only when duplicates = 0, lost = 0, no step failed by infrastructure "
        "and the integrity checks are clean. --naive also runs the same scenario through a "
        "plain retry loop without the guard (the control group) and prints both side by side. "
        "Run it on a scratch database (--database, or `make chaos`): its reconciler loop re-enqueues "
        "any stuck step it finds onto the chaos queue."
    )

    def add_arguments(self, parser):
        parser.add_argument("--inputs", type=_positive, default=30, help="Inputs to submit (default 30).")
        parser.add_argument("--workers", type=_positive, default=2, help="Workers per cluster (default 2).")
        parser.add_argument("--clusters", type=_positive, default=2, help="qcluster processes (default 2; always 1 on SQLite).")
        parser.add_argument("--broker", choices=BROKERS, default=None,
                            help="django-q2 broker for the run (default: the run's database's default: "
                                 "postgres on PostgreSQL, orm on SQLite, or PIPELINE_OPS_BROKER).")
        parser.add_argument("--database", metavar="URL", default="",
                            help="Run against this DATABASE_URL instead of the configured database (migrated first).")
        parser.add_argument("--seed", type=int, default=7, help="Seed for texts, faults and the model server (default 7).")
        parser.add_argument("--timeout", type=float, default=300.0, help="Give up after this many seconds per run (default 300).")
        parser.add_argument("--json", action="store_true", help="Print the summary as JSON on stdout.")
        parser.add_argument("--naive", action="store_true", help="Also run the control group (no guard) and compare.")
        parser.add_argument("--naive-only", action="store_true", help="Run only the control group.")
        parser.add_argument("--stall-rate", type=_rate, default=0.25, help="Share of model calls answered late (default 0.25).")
        parser.add_argument("--stall-seconds", type=float, default=3.0, help="How late a stalled answer comes (default 3).")
        parser.add_argument("--client-timeout", type=float, default=1.0, help="The llm step's read timeout (default 1).")
        parser.add_argument("--error-rate", type=_rate, default=0.08, help="Share of model calls answered 5xx (default 0.08).")
        parser.add_argument("--rate-429", type=_rate, default=0.08, help="Share of model calls answered 429 (default 0.08).")
        parser.add_argument("--latency-ms", type=int, default=150, help="Model latency in ms (default 150).")
        parser.add_argument("--no-kills", action="store_true", help="Do not SIGKILL workers or clusters.")
        parser.add_argument("--db-faults", action="store_true",
                            help="PostgreSQL only: pg_terminate_backend the workers' connections at random moments "
                                 "and run their sessions with a short lock_timeout.")
        parser.add_argument("--db-fault-interval", type=float, default=1.0,
                            help="With --db-faults: mean seconds between two backend terminations (default 1).")
        parser.add_argument("--lock-timeout-ms", type=_positive, default=100,
                            help="With --db-faults: the workers' lock_timeout in milliseconds (default 100).")

    def handle(self, *args, **opts):
        if opts["database"] and opts["database"] != os.environ.get("DATABASE_URL"):
            return self._reexec(opts["database"], opts)
        if opts["client_timeout"] >= opts["stall_seconds"]:
            raise CommandError("--client-timeout must be shorter than --stall-seconds, or no stall is a late answer.")
        # A SIGTERM must unwind through the finally blocks that stop the clusters.
        # Ctrl-C and SIGTERM unwind through the finally blocks that stop every child (SIGINT may
        # arrive ignored when started in the background by a non-interactive shell).
        saved = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            return self._run(opts)
        finally:  # called in-process (call_command in tests): leave the caller's handlers as they were
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])

    def _run(self, opts: dict):
        if opts["db_faults"] and connection.vendor != "postgresql":
            raise CommandError(f"--db-faults needs PostgreSQL (it terminates backends); this database is {connection.vendor}.")
        if opts["db_fault_interval"] <= 0:
            raise CommandError("--db-fault-interval must be positive.")
        call_command("migrate", verbosity=0, interactive=False)
        if connection.vendor == "sqlite" and opts["clusters"] > 1 and not opts["json"]:
            self.stderr.write("SQLite has a single writer: running exactly one cluster.")
        bar = progress_bar(total=None, desc="chaos", unit="step")

        def progress(done: int, total: int, label: str) -> None:
            if bar.disable:
                line(done, total, label)
                return
            bar.total = total
            bar.set_description(label)
            bar.n = done
            bar.refresh()

        line = stderr_progress(every=5.0)
        cfg_args = dict(
            inputs=opts["inputs"], clusters=opts["clusters"], workers=opts["workers"],
            broker=opts["broker"] or settings.PIPELINE_OPS_BROKER,
            queue=queue_name_for(settings.TEST_DB_TAG), seed=opts["seed"], timeout=opts["timeout"],
            latency_ms=opts["latency_ms"], error_rate=opts["error_rate"], rate_429=opts["rate_429"],
            stall_rate=opts["stall_rate"], stall_seconds=opts["stall_seconds"], client_timeout=opts["client_timeout"],
            kill_worker=not opts["no_kills"], kill_cluster=not opts["no_kills"], progress=progress,
            db_faults=opts["db_faults"], db_fault_interval=opts["db_fault_interval"], lock_timeout_ms=opts["lock_timeout_ms"],
        )
        summaries = []
        try:
            if opts["naive"] or opts["naive_only"]:
                summaries.append(run_naive(ChaosConfig(**cfg_args)))
            if not opts["naive_only"]:
                summaries.insert(0, run_guarded(ChaosConfig(**cfg_args)))
        except ClusterError as exc:
            raise CommandError(f"chaos: a cluster failed: {exc}") from exc
        except KeyboardInterrupt as exc:
            raise CommandError("chaos: interrupted; clusters and the model server were stopped") from exc
        finally:
            bar.close()
        if opts["json"]:
            self.stdout.write(json.dumps({"runs": summaries}, indent=2, default=str))
        else:
            self.stdout.write(render(summaries))
        guarded = next((s for s in summaries if s["mode"] == "guarded"), None)
        if guarded is not None and not guarded["ok"]:
            raise CommandError(
                f"chaos: {guarded['duplicates']} duplicates, {guarded['lost']} lost, "
                f"{guarded['failed_by_infrastructure']} failed by infrastructure, "
                f"integrity {'clean' if guarded['integrity']['ok'] else 'VIOLATED'}"
            )

    def _reexec(self, database_url: str, opts: dict):
        """Settings are read once at import: another database means another process."""
        argv = ["chaos"]
        for name in ("inputs", "workers", "clusters", "broker", "seed", "timeout", "stall_rate", "stall_seconds",
                     "client_timeout", "error_rate", "rate_429", "latency_ms", "db_fault_interval", "lock_timeout_ms"):
            if opts[name] is not None:  # an unset --broker is decided by the run's own settings
                argv += [f"--{name.replace('_', '-')}", str(opts[name])]
        argv += [f"--{flag.replace('_', '-')}" for flag in ("json", "naive", "naive_only", "no_kills", "db_faults") if opts[flag]]
        _ensure_database(database_url)
        env = {**os.environ, "DATABASE_URL": database_url}
        result = subprocess.run([sys.executable, "manage.py", *argv], cwd=BASE_DIR, env=env, check=False)
        if result.returncode:
            raise CommandError(f"chaos against {database_url.rsplit('@', 1)[-1]} exited with {result.returncode}")
