"""``manage.py demo`` (what ``make run`` calls): the whole product on the embedded default.

Migrates the SQLite database, makes sure an admin user exists with a freshly generated password
(printed once; nothing fixed ships), starts the web server, one qcluster, the local
fault-injecting model server and the reconciler loop, submits a few inputs to both pipelines,
says where to look, and runs until Ctrl-C, then stops every child it started.
"""
from __future__ import annotations

import secrets
import signal
import sys
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections, connection, transaction

from pipeline_ops.chaos.cluster import ClusterError, ManagedProcess, QCluster, base_env, database_url_for, stop_all

DEMO_TEXTS = [
    "The model call timed out, the retry saved its result, and then the first call finished late. Not again!",
    "Great service: the refund arrived the next morning and the support team was kind and quick.",
    "The shipment is delayed for the third time and nobody answers the phone. This is terrible.",
    "Quarterly report: revenue grew eight percent, costs were flat, and churn fell slightly.",
    "I love how calm the new dashboard is. Failed steps are easy to find and retry safely.",
]
DEMO_SCOPE = "demo"


class Command(BaseCommand):
    help = (
        "Run the demo on the configured (default: embedded SQLite) database: migrate, create or reuse "
        "an admin user with a new random password (printed once), start the web server, one qcluster, "
        "the local fault-injecting model server and the reconciler loop, submit demo inputs to both "
        "pipelines, and keep running until Ctrl-C."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="Web server address (default 127.0.0.1).")
        parser.add_argument("--port", type=int, default=8000, help="Web server port (default 8000).")
        parser.add_argument("--username", default="admin", help="Admin username to create or reuse (default admin).")
        parser.add_argument("--workers", type=int, default=2, help="qcluster workers (default 2).")
        parser.add_argument("--no-serve", action="store_true", help="Do not start the web server.")
        parser.add_argument("--exit-when-done", action="store_true",
                            help="Stop everything and exit once every demo input is terminal (non-interactive smoke runs).")
        parser.add_argument("--timeout", type=float, default=120.0,
                            help="With --exit-when-done: give up when no demo step has moved for this many seconds "
                                 "(default 120). Not a total: a slow but progressing run is waited for.")
        parser.add_argument("--stall-rate", type=float, default=0.2,
                            help="Share of model calls the local model server answers late (default 0.2).")

    def handle(self, *args, **opts):
        if not 1 <= opts["workers"] <= 16:
            raise CommandError("--workers must be between 1 and 16.")
        if not 0.0 <= opts["stall_rate"] <= 1.0:
            raise CommandError("--stall-rate must be between 0 and 1.")
        # Ctrl-C and SIGTERM unwind through the finally blocks that stop every child (SIGINT may
        # arrive ignored when started in the background by a non-interactive shell).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        from pipeline_ops.model_server import ModelServer

        self.stdout.write(f"Migrating {connection.settings_dict['NAME']} ...")
        call_command("migrate", verbosity=0, interactive=False)
        password = self._admin(opts["username"])

        children: list[ManagedProcess] = []
        server = ModelServer(host="127.0.0.1", port=0, latency_ms=300, error_rate=0.05, rate_429=0.05,
                             stall_rate=opts["stall_rate"], stall_seconds=4, honour_keys=True, seed=1)
        log_dir = settings.VAR_DIR / "demo"
        try:
            server.start()
            env = base_env(
                DATABASE_URL=database_url_for(connection.settings_dict), SECRET_KEY=settings.SECRET_KEY,
                LLM_BASE_URL=server.url, LLM_TIMEOUT_SECONDS=2, Q_WORKERS=opts["workers"],
                STEP_TIMEOUT_SECONDS=30, PIPELINE_OPS_BROKER=settings.PIPELINE_OPS_BROKER,
                PIPELINE_OPS_QUEUE=settings.Q_CLUSTER["name"],
            )
            if not opts["no_serve"]:
                web = ManagedProcess(
                    args=[sys.executable, "manage.py", "runserver", f"{opts['host']}:{opts['port']}", "--noreload"],
                    env=env, name="web", log_path=log_dir / "web.log",
                )
                children.append(web.start())
            cluster = QCluster(env=env, name="demo-cluster", log_path=log_dir / "qcluster.log")
            children.append(cluster)
            cluster.start(wait=True)  # waits while it starts, fails fast if it dies or stalls
            inputs = self._submit()
            self._banner(opts, password, server.url, log_dir)
            self._loop(inputs, opts, children)
        except ClusterError as exc:
            raise CommandError(f"demo: the worker cluster did not start: {exc}") from exc
        except KeyboardInterrupt:
            self.stdout.write("\nStopping ...")
        finally:
            stop_all(children, timeout=15)
            server.stop()
        self.stdout.write("Demo stopped; every child process was stopped.")

    def _admin(self, username: str) -> str:
        """Create or reuse the admin; set a new random password each run (no fixed password ships)."""
        User = get_user_model()
        password = secrets.token_urlsafe(12)
        with transaction.atomic():
            user, _ = User.objects.get_or_create(username=username, defaults={"email": f"{username}@localhost"})
            user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
        return password

    def _submit(self) -> list:
        from pipeline_ops.services.inputs import input_submit

        submitted = []
        for pipeline in ("default", "llm"):
            for i, text in enumerate(DEMO_TEXTS):
                # Fixed keys: running the demo again reuses these inputs instead of duplicating them.
                result = input_submit(pipeline=pipeline, payload={"text": text}, scope=DEMO_SCOPE, key=f"{pipeline}-{i}")
                submitted.append(result.input.pk)
        return submitted

    def _progress(self, inputs: list) -> int:
        """A count that only grows while the steps move: attempts started, attempts ended, inputs
        finished (on the demo's own database; earlier runs' rows only add a constant). A retry
        waiting for its backoff (seconds here) shows as no progress for that long, well under
        --timeout."""
        from idempotency.models import Attempt
        from pipeline_ops.models import PipelineInput
        from pipeline_ops.services.inputs import STEP_SCOPE
        from pipeline_ops.states import INPUT_TERMINAL

        attempts = Attempt.objects.filter(record__scope=STEP_SCOPE)
        return (
            attempts.count() + attempts.filter(finished_at__isnull=False).count()
            + PipelineInput.objects.filter(pk__in=inputs, status__in=INPUT_TERMINAL).count()
        )

    def _banner(self, opts: dict, password: str, model_url: str, log_dir) -> None:
        base = f"http://{opts['host']}:{opts['port']}"
        lines = [
            "",
            "pipeline-ops demo is running.",
            f"  Admin:        {base}/admin/" if not opts["no_serve"] else "  Admin:        (web server not started: --no-serve)",
            f"  Log in as:    {opts['username']} / {password}   (new random password each run; "
            f"change it with: manage.py changepassword {opts['username']})",
            f"  Model server: {model_url}/_stats (fault-injecting, OpenAI-compatible)",
            f"  Logs:         {log_dir}",
            "  Look at: Pipeline inputs (step timelines), Attempts (unknown / fenced), the dashboard.",
            "  Other commands, in another shell (the demo's settings: development key, this database):",
            f"    export DEBUG=1 DATABASE_URL={database_url_for(connection.settings_dict)}",
            "    .venv/bin/python manage.py create_api_client NAME     (or pipeline_status, submit FILE, ...)",
            "  Ctrl-C stops everything." if not opts["exit_when_done"] else "  Exits when every demo input is terminal.",
            "",
        ]
        self.stdout.write("\n".join(lines))

    def _loop(self, inputs: list, opts: dict, children: list[ManagedProcess]) -> None:
        from pipeline_ops.models import PipelineInput
        from pipeline_ops.reconciler import reconcile_once
        from pipeline_ops.states import INPUT_TERMINAL

        reported: set = set()
        best, last_progress = -1, time.monotonic()
        interval = min(5.0, float(getattr(settings, "RECONCILER_INTERVAL_SECONDS", 5)))
        last_reconcile = 0.0
        while True:
            close_old_connections()
            for pk, pipeline, status in PipelineInput.objects.filter(pk__in=inputs, status__in=INPUT_TERMINAL).values_list(
                "pk", "pipeline", "status"
            ):
                if pk not in reported:
                    reported.add(pk)
                    self.stdout.write(f"  input {pk} ({pipeline}) -> {status}  [{len(reported)}/{len(inputs)}]")
            if opts["exit_when_done"] and len(reported) == len(inputs):
                return
            mark = self._progress(inputs)
            if mark > best:
                best, last_progress = mark, time.monotonic()
            elif opts["exit_when_done"] and time.monotonic() - last_progress > opts["timeout"]:
                raise CommandError(
                    f"demo: {len(inputs) - len(reported)} inputs not terminal and nothing moved for {opts['timeout']:.0f}s"
                )
            for child in children:
                if not child.alive:
                    raise CommandError(f"demo: {child.name} exited unexpectedly (log: {child.log_path})")
            if time.monotonic() - last_reconcile >= interval:
                reconcile_once()
                last_reconcile = time.monotonic()
            time.sleep(0.5)
