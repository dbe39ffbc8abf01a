"""/metrics under a real multi-worker gunicorn: every scrape, whichever worker answers it, shows
the responses all workers gave (PROMETHEUS_MULTIPROC_DIR + the project's gunicorn config module)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from pipeline_ops.chaos.cluster import database_url_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _counter(text: str, status: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pipeline_ops_http_responses_total" and sample.labels["status"] == status:
                return sample.value
    return 0.0


def test_every_scrape_sums_all_workers_when_gunicorn_runs_several(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"")  # left over by an earlier run
    port = _free_port()
    env = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url_for(connection.settings_dict),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "WEB_CONCURRENCY": "3", "GUNICORN_BIND": f"127.0.0.1:{port}",
        "CONN_MAX_AGE": "0", "API_THROTTLE_RATE": "100000/minute",
    }
    log = open(tmp_path / "gunicorn.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "pipeline_ops.wsgi:application", "-c", "python:pipeline_ops.observability.gunicorn"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()[-2000:]
            try:
                requests.get(f"{url}/healthz", timeout=10)
                break
            except requests.RequestException:  # not listening yet, or the worker still importing
                assert time.monotonic() < deadline, "gunicorn did not come up within 60 s"
                time.sleep(0.2)
        assert not (metrics_dir / "counter_999999.db").exists()
        session = requests.Session()
        answers = {session.get(f"{url}/api/v1/pipelines/", timeout=10).status_code for _ in range(REQUESTS)}
        assert answers == {401}
        scrapes = [requests.get(f"{url}/metrics", timeout=10) for _ in range(6)]
        pids = {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    assert len(pids) >= 2  # the requests really were spread over several workers
    for scrape in scrapes:
        assert scrape.status_code == 200
        assert _counter(scrape.text, "401") == REQUESTS
        assert "pipeline_ops_step_latency_seconds" in scrape.text
