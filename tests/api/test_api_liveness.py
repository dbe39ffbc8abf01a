"""API holders heartbeat and are seen dying, against a real gunicorn on the test database.

The first request with a key is held at a gate after its claim (``tests/api/liveness_urls.py``):
it is alive and working until the test releases it, or the test SIGKILLs the gunicorn worker
serving it. Nothing here depends on a pause being long enough: the test waits for the request to
reach the gate, and decides when it ends.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from django.db import connection

from idempotency import liveness
from idempotency.clock import db_now
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.models import PipelineInput

from .conftest import _database_url, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 30  # the server's lease: a dead holder's key is freed long before it ends
SHORT_LEASE_SECONDS = 3  # ShortLeaseGatedInputApi's
BODY = {"pipeline": "default", "payload": {"text": "Held at the gate."}}


class InBackground(threading.Thread):
    """The first request, sent from a thread so the test can act while the server holds it."""

    def __init__(self, call):
        super().__init__(daemon=True)
        self.call, self.response, self.error = call, None, None

    def run(self):
        try:
            self.response = self.call()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc


class GatedServer:
    def __init__(self, url: str, gates: Path, process: subprocess.Popen):
        self.url, self.gates, self.process = url, gates, process

    def block(self, key: str) -> None:
        (self.gates / f"{key}.block").write_text("")

    def release(self, key: str) -> None:
        (self.gates / f"{key}.release").write_text("")

    def wait_entered(self, key: str, first: InBackground, *, timeout: float = 30) -> dict:
        """Wait for the first request with ``key`` to reach its gate; its pid and attempt."""
        path = self.gates / f"{key}.entered"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.process.poll() is None, "gunicorn died"
            assert first.is_alive(), f"the first request ended before its gate: {first.response and first.response.text or first.error}"
            assert time.monotonic() < deadline, f"no request with key {key!r} reached its gate within {timeout} s"
            time.sleep(0.02)
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def gated_server(django_db_setup, django_db_blocker, tmp_path_factory):
    gates = tmp_path_factory.mktemp("gates")
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.api.liveness_settings",
        "DATABASE_URL": _database_url(),
        "IDEMPOTENCY_LEASE_SECONDS": str(LEASE_SECONDS),
        "LIVENESS_GATES_DIR": str(gates),
        "API_THROTTLE_RATE": "100000/minute",
        "CONN_MAX_AGE": "0",  # no idle server connections holding up the test database's flush and drop
    }
    log = open(gates.parent / f"gunicorn-liveness-{port}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "pipeline_ops.wsgi:application", "--workers", "3", "--bind", f"127.0.0.1:{port}",
         "--preload", "--timeout", "120", "--graceful-timeout", "2"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {process.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/api/v1/pipelines/", timeout=2).status_code == 401:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not come up within 60 s")
            time.sleep(0.2)
        yield GatedServer(url, gates, process)
    finally:
        for path in gates.iterdir():  # let any request still at a gate go
            if path.name.endswith(".blocked"):
                (gates / path.name.replace(".blocked", ".release")).write_text("")
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def post(session: requests.Session, server: GatedServer, path: str, key: str, *, timeout: float = 60) -> requests.Response:
    return session.post(f"{server.url}{path}", json=BODY, headers={"Idempotency-Key": key}, timeout=timeout)


def _lock_holder_pids(record_id: int) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s AND objid = %s AND objsubid = 2",
            [liveness.NAMESPACE, liveness.lock_key(record_id)],
        )
        return [row[0] for row in cursor.fetchall()]


def _wait_for(condition, *, timeout: float = 30, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


@pytest.mark.postgres
def test_retry_succeeds_at_once_when_the_gunicorn_worker_serving_the_key_was_sigkilled(gated_server, live_client):
    session, path, key = live_client("crashed"), "/_test/gated/inputs/", "killed-mid-request"
    gated_server.block(key)
    first = InBackground(lambda: post(session, gated_server, path, key))
    first.start()
    entered = gated_server.wait_entered(key, first)
    attempt = Attempt.objects.get(pk=entered["attempt"])
    _wait_for(lambda: Attempt.objects.filter(pk=attempt.pk, liveness_lock=True).exists(), what="the holder's liveness lock")
    [backend] = _lock_holder_pids(attempt.record_id)
    record = IdempotencyRecord.objects.get(pk=attempt.record_id)
    assert record.lease_expires_at > db_now() + timedelta(seconds=LEASE_SECONDS / 2)  # the lease is far from over

    killed_at = time.monotonic()
    os.kill(entered["pid"], signal.SIGKILL)
    first.join(30)
    assert isinstance(first.error, requests.ConnectionError), (first.response, first.error)
    _wait_for(lambda: backend not in _lock_holder_pids(attempt.record_id), what="the end of the dead worker's session")
    retry = post(session, gated_server, path, key)
    took = time.monotonic() - killed_at
    print(f"\nretry after a SIGKILLed gunicorn worker: {retry.status_code} {took * 1000:.0f} ms after the kill (lease {LEASE_SECONDS} s)")

    assert retry.status_code != 409, retry.text  # not held for the dead worker's lease
    assert retry.status_code == 201, retry.text
    assert "Idempotent-Replayed" not in retry.headers
    assert took < 10  # the goal is < 2 s; generous here for a busy machine (the print says what it was)
    assert PipelineInput.objects.count() == 1
    assert retry.json()["id"] == str(PipelineInput.objects.get().pk)
    attempts = list(record.attempts.order_by("number").values_list("status", "error_type"))
    assert attempts == [(AttemptStatus.TIMED_OUT, "HolderGone"), (AttemptStatus.SUCCEEDED, "")]
    again = post(session, gated_server, path, key)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"


def test_request_longer_than_its_lease_is_never_taken_over_when_its_retry_comes(gated_server, live_client):
    session, path, key = live_client("patient"), "/_test/gated-short-lease/inputs/", "longer-than-its-lease"
    gated_server.block(key)
    first = InBackground(lambda: post(session, gated_server, path, key))
    first.start()
    entered = gated_server.wait_entered(key, first)
    started = time.monotonic()
    conflicts = 0
    # Three leases long: without a heartbeat the retry would take the key over after the first.
    while time.monotonic() - started < 3 * SHORT_LEASE_SECONDS:
        retry = post(session, gated_server, path, key)
        assert retry.status_code == 409, f"after {time.monotonic() - started:.1f} s: {retry.status_code} {retry.text}"
        assert retry.json()["code"] == "idempotency_key_in_progress"
        assert 1 <= int(retry.headers["Retry-After"]) <= SHORT_LEASE_SECONDS
        conflicts += 1
        time.sleep(0.2)
    gated_server.release(key)
    first.join(60)
    assert first.error is None, first.error
    assert first.response.status_code == 201, first.response.text
    assert "Idempotent-Replayed" not in first.response.headers
    assert conflicts >= 10
    assert PipelineInput.objects.count() == 1
    record = IdempotencyRecord.objects.get(pk=Attempt.objects.get(pk=entered["attempt"]).record_id)
    assert (record.status, record.attempt_count) == (RecordStatus.COMPLETED, 1)
    [(status, heartbeat_at)] = record.attempts.values_list("status", "heartbeat_at")
    assert status == AttemptStatus.SUCCEEDED and heartbeat_at is not None
    replay = post(session, gated_server, path, key)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.content == first.response.content


@pytest.mark.postgres
def test_each_worker_keeps_one_liveness_session_when_keyed_requests_come_concurrently(gated_server, live_client):
    """No connection per request: every keyed request of a worker takes its lock in the worker's
    one liveness session (``idempotency-liveness:<worker pid>``), however many come."""
    token = live_client("many")
    requests_count, threads_count = 36, 6
    keys = iter(range(requests_count))
    keys_lock = threading.Lock()
    statuses: list[int] = []
    seen: dict[str, set[int]] = {}
    done = threading.Event()

    def client():
        session = requests.Session()
        session.headers.update(token.headers)
        while True:
            with keys_lock:
                number = next(keys, None)
            if number is None:
                return
            statuses.append(post(session, gated_server, "/api/v1/inputs/", f"many-{number}").status_code)

    def sample():
        from django.db import connections

        try:
            while not done.is_set():
                with connections["default"].cursor() as cursor:
                    cursor.execute(
                        "SELECT application_name, pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name LIKE %s",
                        [f"{liveness.APPLICATION_NAME}:%"],
                    )
                    for name, pid in cursor.fetchall():
                        seen.setdefault(name, set()).add(pid)
        finally:
            connections.close_all()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(threads_count)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    done.set()
    sampler.join(30)
    assert statuses == [201] * requests_count, statuses
    assert PipelineInput.objects.count() == requests_count
    assert Attempt.objects.filter(liveness_lock=True).count() == requests_count  # each one was locked
    assert seen, "no liveness session was ever seen"
    assert len(seen) <= 3  # the server's workers
    assert all(len(pids) == 1 for pids in seen.values()), seen  # one session per worker, for all its requests
