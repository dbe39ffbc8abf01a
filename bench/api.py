"""Benchmark (not a test): keyed ``POST /api/v1/inputs/`` through a real gunicorn on 127.0.0.1,
with the idempotency layer on, against the same submission with it off, same server, same run.

Creates a scratch PostgreSQL database (``benchwt_api_<pid>``), migrates it, creates an API client,
and starts gunicorn with ``PIPELINE_OPS_API_BENCH=1``, which mounts ``/api/v1/_bench/inputs/``: the
same view code (authentication, throttling, body limit, validation, ``input_submit``, the same
response body and ``Location``) without the guard (no record, no attempt, no stored response).
Every request, on both sides, carries a fresh ``Idempotency-Key``. The two sides alternate in
rounds (keyed first in even rounds, unkeyed first in odd ones) so that warm-up, autovacuum and
table growth hit both alike: many short rounds, because on a shared machine the background load
changes within seconds. ``--rounds`` must be at least 3.

Prints the command and the settings, then per side the median of the per-round rates and p50/p99
latency over all its requests, the median of the per-round ratios, and last
``RATIO api.keyed/unkeyed <value>`` (the median of the per-round keyed/unkeyed rate ratios).
Drops the scratch database and stops the server at the end.

    .venv/bin/python bench/api.py [--requests 2000] [--rounds 20] [--concurrency 4] [--workers 4]
        [--database-url postgres://postgres@127.0.0.1:5432/postgres]
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rounds import (  # noqa: E402
    median, order, per_round_ratios, print_command, print_ratios, print_settings, rounds_type,
)

BODY = {"pipeline": "default", "payload": {"text": "The delivery was late, but the support team was wonderful."}}
MODES = {"keyed": "/api/v1/inputs/", "unkeyed": "/api/v1/_bench/inputs/"}
MODE_SETTINGS = {
    "keyed": "POST /api/v1/inputs/: the product's view, idempotency layer on (claim, input_submit, stored response)",
    "unkeyed": "POST /api/v1/_bench/inputs/: the same view code and input_submit, no idempotency layer "
               "(the Idempotency-Key header is parsed and passed as the input's key, nothing stored for it)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="Requests per mode (split over the rounds).")
    parser.add_argument("--rounds", type=rounds_type, default=20,
                        help="Alternating rounds per side, at least 3 (default 20); figures are medians of the rounds.")
    parser.add_argument("--concurrency", type=int, default=4, help="Client threads.")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers.")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres",
                        help="Server to create the scratch database on (it must be PostgreSQL).")
    args = parser.parse_args()
    if args.requests < args.rounds:
        parser.error("--requests must be at least --rounds")

    from bench.scratch import scratch_database

    with scratch_database(args.database_url, name=f"benchwt_api_{os.getpid()}", script="bench/api.py") as url:
        return serve_and_run(args, url)


def serve_and_run(args, database_url: str) -> int:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SECRET_KEY": os.environ.get("SECRET_KEY", "bench-only-secret-key"),
        "DJANGO_SETTINGS_MODULE": "pipeline_ops.settings",
        "PIPELINE_OPS_BROKER": "orm",
        "PIPELINE_OPS_QUEUE": f"bench_wt_api_{os.getpid()}",
        "PIPELINE_OPS_API_BENCH": "1",
        "API_THROTTLE_RATE": "100000000/second",
        "LOG_LEVEL": "ERROR",
    }
    gunicorn = None
    try:
        py = sys.executable
        subprocess.run([py, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        token = subprocess.run([py, "manage.py", "create_api_client", "bench"], cwd=ROOT, env=env, check=True,
                               capture_output=True, text=True).stdout.strip()
        port = _free_port()
        command = [py, "-m", "gunicorn", "pipeline_ops.wsgi:application", "--workers", str(args.workers),
                   "--bind", f"127.0.0.1:{port}", "--preload", "--log-level", "warning"]
        gunicorn = subprocess.Popen(command, cwd=ROOT, env=env)
        base = f"http://127.0.0.1:{port}"
        _wait_up(base, gunicorn, token)
        shown = {k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "PIPELINE_OPS_BROKER", "PIPELINE_OPS_QUEUE",
                                      "PIPELINE_OPS_API_BENCH", "API_THROTTLE_RATE", "LOG_LEVEL")}
        server = {"gunicorn": shlex.join(command), **shown,
                  "database": _describe_database(env), "client": f"{args.concurrency} threads, requests.Session each"}
        return run(args, base, token, server)
    finally:
        if gunicorn is not None:
            gunicorn.send_signal(signal.SIGTERM)
            try:
                gunicorn.wait(timeout=20)
            except subprocess.TimeoutExpired:
                gunicorn.kill()
                gunicorn.wait()


def _describe_database(env: dict) -> str:
    """The effective DATABASES["default"] of the server's settings, read in a child with its environment."""
    code = ("import django, json; django.setup(); from django.conf import settings; d = settings.DATABASES['default'];"
            "print(json.dumps({k: d.get(k) for k in ('ENGINE', 'NAME', 'CONN_MAX_AGE', 'CONN_HEALTH_CHECKS', 'OPTIONS')}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    return done.stdout.strip() or f"(unreadable: {done.stderr.strip()[-200:]})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(base: str, process: subprocess.Popen, token: str) -> None:
    import requests

    # Authenticated, so the probe itself does not log an "Unauthorized" warning.
    headers = {"Authorization": f"Token {token}"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gunicorn exited with {process.returncode}")
        try:
            requests.get(f"{base}/api/v1/pipelines/", headers=headers, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit("gunicorn did not come up within 60 s")


def _burst(url: str, token: str, count: int, concurrency: int) -> tuple[float, list[float]]:
    """``count`` keyed POSTs over ``concurrency`` threads: (wall seconds, latencies in seconds)."""
    import requests

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    remaining = iter(range(count))

    def worker() -> None:
        session = requests.Session()
        session.headers.update({"Authorization": f"Token {token}"})
        own: list[float] = []
        while True:
            with lock:
                if next(remaining, None) is None:
                    break
            start = time.perf_counter()
            response = session.post(url, json=BODY, headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=60)
            own.append(time.perf_counter() - start)
            if response.status_code != 201:
                with lock:
                    failures.append(f"{response.status_code} {response.text[:200]}")
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return wall, latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args, base: str, token: str, server: dict) -> int:
    per_round = max(1, args.requests // args.rounds)
    # Warm-up: connections, imports, caches, in both modes; not measured.
    for path in MODES.values():
        _burst(base + path, token, args.concurrency * 4, args.concurrency)
    rates = {mode: [] for mode in MODES}
    latencies = {mode: [] for mode in MODES}
    for round_number in range(args.rounds):
        for mode in order(list(MODES), round_number):
            wall, lat = _burst(base + MODES[mode], token, per_round, args.concurrency)
            rates[mode].append(len(lat) / wall)
            latencies[mode].extend(lat)
    ratios = per_round_ratios(rates["keyed"], rates["unkeyed"])

    print_command(f"bench/api.py: POST, {per_round} requests per side per round, {args.rounds} alternating rounds, "
                  f"{args.concurrency} client threads, gunicorn {args.workers} sync workers, PostgreSQL, {os.cpu_count()} CPUs")
    print_settings("server, both sides", server)
    print_settings("sides", MODE_SETTINGS)
    print()
    print("req/s are medians of the per-round rates; latencies over all requests of a side")
    for mode in MODES:
        lat = latencies[mode]
        print(f"  {mode:<8} {median(rates[mode]):8.1f} req/s   p50 {1000 * median(lat):6.1f} ms   "
              f"p99 {1000 * _pct(lat, 0.99):6.1f} ms   per round: {', '.join(f'{v:.0f}' for v in rates[mode])}")
    print(f"  keyed/unkeyed: median of the {args.rounds} per-round ratios {median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    print_ratios({"api.keyed/unkeyed": median(ratios)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
