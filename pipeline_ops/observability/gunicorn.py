"""A gunicorn config module for /metrics under several workers:

    PROMETHEUS_MULTIPROC_DIR=/run/pipeline-ops/metrics \
        gunicorn pipeline_ops.wsgi -c python:pipeline_ops.observability.gunicorn --bind 127.0.0.1:8000

Each worker writes its counters to files in ``PROMETHEUS_MULTIPROC_DIR`` and every scrape adds
them up, whichever worker answers. The directory must start empty: counters left by a previous
run would be added to the new ones (``on_starting`` empties it).
"""
from __future__ import annotations

import os
from pathlib import Path

workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
# API requests are short; a slow one is a bug, not a reason to hold a worker for minutes.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 30
accesslog = "-"


def on_starting(server) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        server.log.warning("PROMETHEUS_MULTIPROC_DIR is not set: /metrics shows one worker's HTTP counters only")
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()


def child_exit(server, worker) -> None:
    # Live gauges of a dead worker must not be summed any more (counters keep their totals).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
