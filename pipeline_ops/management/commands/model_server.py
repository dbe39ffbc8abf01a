"""Run the fault-injecting OpenAI-compatible model server until SIGTERM or Ctrl-C."""
from __future__ import annotations

import signal
import sys
import threading

from django.core.management.base import BaseCommand, CommandError

from pipeline_ops.model_server import ModelServer


class Command(BaseCommand):
    # It touches neither the database nor the admin: start even where those are misconfigured.
    requires_system_checks: list[str] = []
    help = (
        "Run a local OpenAI-compatible model server (POST /v1/chat/completions) that injects faults: "
        "latency, 500s, 429s with Retry-After, and stalls past the client's timeout after processing "
        "the call (the incident). GET /_stats shows calls per Idempotency-Key; POST /_config changes knobs."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
        parser.add_argument("--port", type=int, default=8765, help="Port (default 8765; 0 picks a free one).")
        parser.add_argument("--latency-ms", type=float, default=0.0, help="Added to every answer.")
        parser.add_argument("--error-rate", type=float, default=0.0, help="Share of calls answered 500 (0..1).")
        parser.add_argument("--rate-429", type=float, default=0.0, help="Share of calls answered 429 (0..1).")
        parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429s.")
        parser.add_argument("--stall-rate", type=float, default=0.0, help="Share of calls processed, then answered late (0..1).")
        parser.add_argument("--stall-seconds", type=float, default=0.0, help="How late a stalled answer comes.")
        parser.add_argument("--honour-keys", action="store_true", help="Answer a repeated Idempotency-Key with its first answer.")
        parser.add_argument("--seed", type=int, default=None, help="Seed for the fault draws (reproducible runs).")

    def handle(self, *args, **options):
        knobs = {name: options[name] for name in (
            "latency_ms", "error_rate", "rate_429", "retry_after", "stall_rate", "stall_seconds", "honour_keys", "seed")}
        try:
            server = ModelServer(host=options["host"], port=options["port"], **knobs)
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc)) from exc

        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
        try:
            server.start()
        except OSError as exc:
            raise CommandError(f"cannot listen on {options['host']}:{options['port']}: {exc.strerror or exc}") from exc
        # One parseable line: scripts wait for it, then read the URL.
        self.stdout.write(f"model server listening on {server.url}")
        sys.stdout.flush()
        try:
            while server.running and not stopping.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
        stats = server.stats()
        self.stdout.write(f"model server stopped: {stats['total_calls']} calls, {stats['distinct_keys']} distinct keys")
