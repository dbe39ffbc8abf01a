"""Benchmark (not a test): keyed ``POST /api/v1/inputs/`` through a real gunicorn on 127.0.0.1,
with the idempotency layer on, against the same submission with it off, same server, same run.

Creates a scratch PostgreSQL database, migrates it, creates an API client, and starts gunicorn with
``PIPELINE_OPS_API_BENCH=1``, which mounts ``/api/v1/_bench/inputs/``: the same view code
(authentication, throttling, body limit, validation, ``input_submit``, the same response body and
``Location``) without the guard (no record, no attempt, no stored response). Every request carries
a fresh ``Idempotency-Key``. The two modes alternate in rounds so that warm-up, autovacuum and
table growth hit both alike: many short rounds, because on a shared machine the background load
changes within seconds. Prints requests/s, p50/p99 latency per mode, the ratio of the totals and
the median of the per-round ratios.
Drops the scratch database and stops the server at the end.

    .venv/bin/python bench/api.py [--requests 2000] [--rounds 20] [--concurrency 4] [--workers 4]
        [--database-url postgres://postgres@127.0.0.1:5432/postgres]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BODY = {"pipeline": "default", "payload": {"text": "The delivery was late, but the support team was wonderful."}}
MODES = {"guarded": "/api/v1/inputs/", "unguarded": "/api/v1/_bench/inputs/"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="Requests per mode (split over the rounds).")
    parser.add_argument("--rounds", type=int, default=20, help="Alternating rounds per mode.")
    parser.add_argument("--concurrency", type=int, default=4, help="Client threads.")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers.")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres",
                        help="Server to create the scratch database on (it must be PostgreSQL).")
    args = parser.parse_args()

    import dj_database_url
    import psycopg

    server = dj_database_url.parse(args.database_url)
    if "postgresql" not in server["ENGINE"]:
        raise SystemExit("bench/api.py measures PostgreSQL: give a postgres:// --database-url")
    scratch = f"bench_api_{os.getpid()}"
    admin_dsn = dict(host=server["HOST"] or "127.0.0.1", port=server["PORT"] or 5432, user=server["USER"] or "postgres",
                     password=server["PASSWORD"] or None, dbname=server["NAME"] or "postgres")
    with psycopg.connect(**admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{scratch}"')
    env = {
        **os.environ,
        "DATABASE_URL": args.database_url.rsplit("/", 1)[0] + f"/{scratch}",
        "SECRET_KEY": os.environ.get("SECRET_KEY", "bench-only-secret-key"),
        "DJANGO_SETTINGS_MODULE": "pipeline_ops.settings",
        "PIPELINE_OPS_BROKER": "orm",
        "PIPELINE_OPS_QUEUE": f"bench-api-{os.getpid()}",
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
        gunicorn = subprocess.Popen(
            [py, "-m", "gunicorn", "pipeline_ops.wsgi:application", "--workers", str(args.workers), "--bind", f"127.0.0.1:{port}",
             "--preload", "--log-level", "warning"],
            cwd=ROOT, env=env,
        )
        base = f"http://127.0.0.1:{port}"
        _wait_up(base, gunicorn, token)
        return run(args, base, token)
    finally:
        if gunicorn is not None:
            gunicorn.send_signal(signal.SIGTERM)
            try:
                gunicorn.wait(timeout=20)
            except subprocess.TimeoutExpired:
                gunicorn.kill()
                gunicorn.wait()
        with psycopg.connect(**admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')


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


def run(args, base: str, token: str) -> int:
    per_round = max(1, args.requests // args.rounds)
    # Warm-up: connections, imports, caches, in both modes; not measured.
    for path in MODES.values():
        _burst(base + path, token, args.concurrency * 4, args.concurrency)
    totals = {mode: {"wall": 0.0, "latencies": []} for mode in MODES}
    round_ratios = []
    for round_number in range(args.rounds):
        order = list(MODES) if round_number % 2 == 0 else list(reversed(MODES))
        walls = {}
        for mode in order:
            wall, latencies = _burst(base + MODES[mode], token, per_round, args.concurrency)
            walls[mode] = wall
            totals[mode]["wall"] += wall
            totals[mode]["latencies"].extend(latencies)
        round_ratios.append(walls["unguarded"] / walls["guarded"])
    print(f"POST /api/v1/inputs/, {per_round * args.rounds} keyed requests per mode in {args.rounds} alternating rounds, "
          f"{args.concurrency} client threads, gunicorn {args.workers} sync workers, PostgreSQL, {os.cpu_count()} CPUs")
    rates = {}
    for mode, data in totals.items():
        rates[mode] = len(data["latencies"]) / data["wall"]
        lat = data["latencies"]
        print(f"  {mode:<10} {rates[mode]:8.1f} req/s   p50 {1000 * statistics.median(lat):6.1f} ms   p99 {1000 * _pct(lat, 0.99):6.1f} ms")
    print(f"  ratio guarded/unguarded: {rates['guarded'] / rates['unguarded']:.2f}x "
          f"(median of the {args.rounds} per-round ratios: {statistics.median(round_ratios):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
