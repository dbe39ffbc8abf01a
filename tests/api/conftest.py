"""Fixtures for the API tests: clients with tokens, and a real gunicorn server on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.cache import cache
from django.db import connection

from pipeline_ops.services.tokens import api_token_create
from rest_framework.test import APIClient

from pipeline_ops.api import faults

ROOT = Path(__file__).resolve().parents[2]
# The live server's lease: short enough that the crash-before-commit test waits only seconds for
# the takeover. The "slow first request" does not depend on it: the test holds that request open
# (faults.HOLD_BEFORE_WORK, which heartbeats its lease) and releases it when it is done.
LIVE_LEASE_SECONDS = 8
# Hang guard for a step the server confirms (a held request): not a pace, a broken server's limit.
HANG_GUARD_SECONDS = 120


@pytest.fixture(autouse=True)
def _fresh_throttle_counters():
    # Throttle counters live in the (per-process) cache; user ids may repeat across rolled-back tests.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def make_client(db):
    """``make_client("name", operator=False) -> (user, token, APIClient)``, token-authenticated."""

    def make(name: str, *, operator: bool = False):
        user = get_user_model().objects.create_user(username=name)
        if operator:
            user.user_permissions.add(*Permission.objects.filter(
                content_type__app_label="pipeline_ops",
                codename__in=["retry_steprun", "force_retry_steprun", "cancel_pipelineinput", "view_pipelineinput"],
            ))
        _, token = api_token_create(user=user)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        return user, token, client

    return make


def submit(client, body=None, *, key: str | None = "key-1", **headers):
    """POST /api/v1/inputs/ with an Idempotency-Key (None: without the header)."""
    body = body if body is not None else {"pipeline": "default", "payload": {"text": "The service was great."}}
    if key is not None:
        headers["HTTP_IDEMPOTENCY_KEY"] = key
    return client.post("/api/v1/inputs/", body, format="json", **headers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _database_url() -> str:
    cfg = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{cfg['NAME']}"
    auth = cfg["USER"] + (f":{cfg['PASSWORD']}" if cfg["PASSWORD"] else "")
    return f"postgres://{auth}@{cfg['HOST'] or '127.0.0.1'}:{cfg['PORT'] or 5432}/{cfg['NAME']}"


class LiveServer:
    def __init__(self, url: str, faults_dir: Path, process: subprocess.Popen):
        self.url, self.faults_dir, self.process = url, faults_dir, process

    def arm(self, fault: str, argument: str = "") -> None:
        """Arm a crash point of pipeline_ops.api.faults: the next request reaching it fires it."""
        (self.faults_dir / fault).write_text(argument)

    def wait_held(self, fault: str) -> None:
        """Return once a request reached ``fault`` (a hold point) and holds there; fail at once
        if the server died. The request was sent already, so this waits on the server alone."""
        held = self.faults_dir / (fault + faults.HELD_SUFFIX)
        deadline = time.monotonic() + HANG_GUARD_SECONDS
        while not held.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode} before {fault} was held")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no request reached {fault} within {HANG_GUARD_SECONDS}s")
            time.sleep(0.02)

    def release(self, fault: str) -> None:
        """Let the request held at ``fault`` go on."""
        (self.faults_dir / (fault + faults.RELEASE_SUFFIX)).touch()

    def disarm_all(self) -> None:
        for path in self.faults_dir.iterdir():
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def gunicorn_process(django_db_setup, django_db_blocker, tmp_path_factory):
    """gunicorn with 4 sync workers on 127.0.0.1, on the test database (tests using it need
    ``transaction=True`` so the server sees their rows)."""
    faults_dir = tmp_path_factory.mktemp("faults")
    port = _free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": _database_url(),
        "IDEMPOTENCY_LEASE_SECONDS": str(LIVE_LEASE_SECONDS),
        "IDEMPOTENCY_MAX_WAIT_SECONDS": "30",
        "PIPELINE_OPS_API_FAULTS_DIR": str(faults_dir),
        "API_THROTTLE_RATE": "100000/minute",
        "CONN_MAX_AGE": "0",  # no idle server connections holding up the test database's flush and drop
    }
    log = open(faults_dir.parent / f"gunicorn-{port}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "pipeline_ops.wsgi:application", "--workers", "4", "--bind", f"127.0.0.1:{port}",
         "--preload", "--timeout", "60", "--graceful-timeout", "2"],
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
        yield LiveServer(url, faults_dir, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def gunicorn_server(gunicorn_process, transactional_db):
    gunicorn_process.disarm_all()
    yield gunicorn_process
    gunicorn_process.disarm_all()


@pytest.fixture
def live_client(transactional_db):
    """``live_client("name") -> requests.Session`` with the client's token (committed rows)."""

    def make(name: str) -> requests.Session:
        user = get_user_model().objects.create_user(username=name)
        _, token = api_token_create(user=user)
        session = requests.Session()
        session.headers["Authorization"] = f"Token {token}"
        return session

    return make


__all__ = ["submit", "LIVE_LEASE_SECONDS", "settings"]
