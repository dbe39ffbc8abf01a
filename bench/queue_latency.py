#!/usr/bin/env python
"""Idle-queue latency, enqueue to task start: the PostgreSQL broker against django-q2's ORM broker.

Not a test: a benchmark. On a scratch PostgreSQL database it starts two real ``qcluster``
processes at the same ``poll`` (and the same everything else): one on django-q2's ORM broker
(``orm``), one on pipeline_ops.pg_broker (``postgres``), each on its own queue. Then, in
``--rounds`` rounds alternating the order (A B, B A, ...), it sends ``--samples`` tasks to each
cluster one at a time, each after a random pause on an idle queue (so the ORM broker's poll is
sampled at every phase). A task records ``time.time() - <its enqueue time>`` the moment it starts
in the worker (same host, same clock). Per round: p50 and p99 per broker; the figures are the
medians over the rounds. Usage:

    .venv/bin/python bench/queue_latency.py [--samples 40] [--rounds 3] [--poll 0.2] [--workers 2]
        [--database-url postgres://postgres@127.0.0.1:5432/postgres]

It ends with ``RATIO queue_latency.p50.orm/postgres <x>`` and ``RATIO queue_latency.p99.orm/postgres <x>``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROKERS = ("orm", "postgres")


def task_started(sample: str, enqueued_at: float, out: str) -> None:
    """The task: runs in a worker of the cluster; its first act is to take the time."""
    latency = time.time() - enqueued_at
    with open(out, "a") as f:
        f.write(f"{sample} {latency:.6f}\n")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _samples(*, broker, kind: str, n: int, poll: float, out: Path, stall: float = 60.0) -> list[float]:
    from django_q.tasks import async_task

    from pipeline_ops.chaos.brokers import use_broker

    latencies = []
    with use_broker(kind=kind, queue=broker) as queue_broker:
        for i in range(n):
            time.sleep(random.uniform(0.02, 0.02 + 1.5 * poll))  # idle: the pusher is polling / listening
            sample = f"{kind}-{time.monotonic_ns()}-{i}"
            async_task("bench.queue_latency.task_started", sample, time.time(), str(out), broker=queue_broker)
            deadline = time.monotonic() + stall
            while True:
                lines = [line.split() for line in out.read_text().splitlines()] if out.exists() else []
                found = [float(v) for s, v in lines if s == sample]
                if found:
                    latencies.append(found[0])
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench/queue_latency.py: {kind}: sample {i} never started ({stall:.0f} s)")
                time.sleep(0.002)
    return latencies


def run(args, url: str) -> int:
    import django

    sys.path.insert(0, str(ROOT))
    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from pipeline_ops.chaos.cluster import QCluster, base_env

    call_command("migrate", verbosity=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-queue-latency-"))
    queues = {kind: f"bench_queue_latency_{kind}_{os.getpid()}" for kind in BROKERS}
    clusters = {
        kind: QCluster(
            env=base_env(DATABASE_URL=url, SECRET_KEY=settings.SECRET_KEY, PIPELINE_OPS_BROKER=kind,
                         PIPELINE_OPS_QUEUE=queues[kind], Q_WORKERS=args.workers, Q_POLL=args.poll,
                         Q_LOG_LEVEL="ERROR", LOG_LEVEL="ERROR", PIPELINE_OPS_VAR_DIR=str(tmp)),
            name=f"latency-{kind}", log_path=tmp / f"{kind}.log",
        )
        for kind in BROKERS
    }
    per_round: dict[str, list[tuple[float, float]]] = {kind: [] for kind in BROKERS}
    try:
        for cluster in clusters.values():
            cluster.start(wait=True)
        for kind in BROKERS:  # warm-up: imports, connections, the listener
            _samples(broker=queues[kind], kind=kind, n=3, poll=args.poll, out=tmp / f"warm-{kind}.txt")
        for r in range(args.rounds):
            order = BROKERS if r % 2 == 0 else tuple(reversed(BROKERS))
            for kind in order:
                got = _samples(broker=queues[kind], kind=kind, n=args.samples, poll=args.poll, out=tmp / f"r{r}-{kind}.txt")
                p50, p99 = _percentile(got, 0.5), _percentile(got, 0.99)
                per_round[kind].append((p50, p99))
                print(f"  round {r + 1} {kind:8s}: p50 {p50 * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms  ({len(got)} tasks)",
                      flush=True)
    finally:
        for cluster in clusters.values():
            cluster.kill()
    p50 = {kind: statistics.median(p for p, _ in per_round[kind]) for kind in BROKERS}
    p99 = {kind: statistics.median(p for _, p in per_round[kind]) for kind in BROKERS}
    print(f"bench/queue_latency.py: idle queue, enqueue to task start, poll {args.poll} s, {args.workers} workers, "
          f"{args.rounds} rounds x {args.samples} tasks per broker, medians of the rounds")
    for kind in BROKERS:
        print(f"  {kind:8s}: p50 {p50[kind] * 1000:7.2f} ms   p99 {p99[kind] * 1000:7.2f} ms")
    print(f"RATIO queue_latency.p50.orm/postgres {p50['orm'] / p50['postgres']:.2f}")
    print(f"RATIO queue_latency.p99.orm/postgres {p99['orm'] / p99['postgres']:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40, help="tasks per broker per round (default 40)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll", type=float, default=0.2, help="Q_CLUSTER poll of both clusters, seconds (default 0.2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    if args.rounds < 3 or args.samples < 5:
        raise SystemExit("bench/queue_latency.py: --rounds must be at least 3 and --samples at least 5")

    sys.path.insert(0, str(ROOT))
    from bench.scratch import scratch_database

    with scratch_database(args.database_url, name=f"bench_queue_latency_{os.getpid()}", script="bench/queue_latency.py") as url:
        os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
        os.environ["DJANGO_SETTINGS_MODULE"] = "pipeline_ops.settings"
        os.environ["PIPELINE_OPS_BROKER"] = "postgres"
        os.environ["PIPELINE_OPS_QUEUE"] = f"bench_queue_latency_{os.getpid()}"
        return run(args, url)


if __name__ == "__main__":
    raise SystemExit(main())
