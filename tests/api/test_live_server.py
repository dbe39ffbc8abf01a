"""The contract against a real multi-process server: gunicorn with 4 workers on 127.0.0.1, on the
test database. Crashes are real SIGKILLs of the serving worker at chosen points
(pipeline_ops.api.faults), the slow first request a real hold after its claim that the test releases."""
from __future__ import annotations

import threading

import pytest
import requests

from idempotency.models import IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.api import faults
from pipeline_ops.models import PipelineInput

from .conftest import LIVE_LEASE_SECONDS

pytestmark = pytest.mark.slow

BODY = {"pipeline": "default", "payload": {"text": "The model timed out but got the call."}}


def post(session: requests.Session, server, key: str, *, timeout: float | tuple[float, float] = 30, **headers) -> requests.Response:
    return session.post(f"{server.url}/api/v1/inputs/", json=BODY, headers={"Idempotency-Key": key, **headers}, timeout=timeout)


def test_incident_over_http_creates_one_input_when_the_client_times_out_and_retries(gunicorn_server, live_client):
    session = live_client("impatient")
    # The first request claims the key and is held there until this test releases it: "still
    # running" for as long as the steps below need, on any machine (no pause that must be long enough).
    gunicorn_server.arm(faults.HOLD_BEFORE_WORK)
    # 1. The client gives up on it (the server goes on). Only the read times out: the request was sent.
    with pytest.raises(requests.ReadTimeout):
        post(session, gunicorn_server, "incident-1", timeout=(30, 0.5))
    gunicorn_server.wait_held(faults.HOLD_BEFORE_WORK)
    # 2. It retries at once: the first still holds the key.
    busy = post(session, gunicorn_server, "incident-1")
    assert busy.status_code == 409
    assert busy.headers["Content-Type"] == "application/problem+json"
    assert busy.json()["code"] == "idempotency_key_in_progress"
    assert 1 <= int(busy.headers["Retry-After"]) <= LIVE_LEASE_SECONDS
    # 3. It asks to wait a second: the server waits, the first is still held, so 409 saying it waited.
    waited_out = post(session, gunicorn_server, "incident-1", Prefer="wait=1")
    assert waited_out.status_code == 409
    assert waited_out.headers["Preference-Applied"] == "wait=1"
    # 4. It asks to wait longer, and the first is let go meanwhile: the first's response, replayed.
    replies: list[requests.Response] = []
    waiter = threading.Thread(target=lambda: replies.append(post(session, gunicorn_server, "incident-1", Prefer="wait=30")))
    waiter.start()
    gunicorn_server.release(faults.HOLD_BEFORE_WORK)
    waiter.join()
    (waited,) = replies
    assert waited.status_code == 201
    assert waited.headers["Idempotent-Replayed"] == "true"
    # (Whether it still met the first in flight depends on which came first; step 3 proved the wait.)
    assert waited.headers.get("Preference-Applied", "wait=30") == "wait=30"
    # 5. A retry after completion replays the same response.
    later = post(session, gunicorn_server, "incident-1")
    assert later.status_code == 201 and later.headers["Idempotent-Replayed"] == "true"
    assert later.content == waited.content
    assert PipelineInput.objects.count() == 1
    assert waited.json()["id"] == str(PipelineInput.objects.get().pk)
    # One attempt did the work: the retries were told to wait or replayed, none took over.
    assert list(IdempotencyRecord.objects.get().attempts.values_list("status", flat=True)) == [AttemptStatus.SUCCEEDED]


def test_retry_replays_the_stored_response_when_the_server_was_killed_after_the_commit(gunicorn_server, live_client):
    session = live_client("survivor")
    gunicorn_server.arm(faults.KILL_AFTER_COMMIT)
    with pytest.raises(requests.ConnectionError):
        post(session, gunicorn_server, "crash-after")
    assert PipelineInput.objects.count() == 1  # committed with its stored response, then SIGKILL
    assert IdempotencyRecord.objects.get().status == RecordStatus.COMPLETED
    retry = post(session, gunicorn_server, "crash-after")
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["id"] == str(PipelineInput.objects.get().pk)
    assert PipelineInput.objects.count() == 1


def test_retry_creates_the_input_once_after_the_lease_when_the_server_was_killed_before_the_commit(gunicorn_server, live_client):
    session = live_client("survivor")
    gunicorn_server.arm(faults.KILL_BEFORE_COMMIT)
    with pytest.raises(requests.ConnectionError):
        post(session, gunicorn_server, "crash-before")
    assert PipelineInput.objects.count() == 0  # the input's transaction died with the process
    record = IdempotencyRecord.objects.get()
    assert record.status == RecordStatus.PROCESSING  # the dead worker's claim still holds its lease
    # At once: the key is held by the dead attempt until its lease ends, unless PostgreSQL saw the
    # worker's session end (its heartbeat had taken the liveness lock): then the retry takes over
    # at once (test_api_liveness.py proves that case on its own).
    retry = post(session, gunicorn_server, "crash-before")
    if retry.status_code == 409:
        assert int(retry.headers["Retry-After"]) >= 1
        # After the lease (waiting for it server-side), the retry takes over and creates the input once.
        retry = post(session, gunicorn_server, "crash-before", Prefer=f"wait={LIVE_LEASE_SECONDS + 4}")
    else:
        assert record.attempts.get(number=1).liveness_lock  # only a holder seen dying goes before its lease
    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry.headers
    assert PipelineInput.objects.count() == 1
    assert retry.json()["id"] == str(PipelineInput.objects.get().pk)
    statuses = list(record.attempts.order_by("number").values_list("status", flat=True))
    assert statuses == [AttemptStatus.TIMED_OUT, AttemptStatus.SUCCEEDED]
    again = post(session, gunicorn_server, "crash-before")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.content == retry.content


@pytest.mark.postgres
def test_concurrent_posts_with_one_key_create_exactly_one_input_when_32_race(gunicorn_server, live_client):
    session_factory = live_client("racer")
    token = session_factory.headers["Authorization"]
    # The winner pauses a moment after its claim, so the racers also meet a key in flight (409),
    # not only a completed one (replay).
    gunicorn_server.arm(faults.SLEEP_BEFORE_WORK, "1")
    barrier = threading.Barrier(32)
    responses: list[requests.Response] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def fire():
        with requests.Session() as own:  # one connection per thread: truly concurrent requests
            own.headers["Authorization"] = token
            barrier.wait()
            try:
                response = post(own, gunicorn_server, "race-key")
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                return
            with lock:
                responses.append(response)

    threads = [threading.Thread(target=fire) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(responses) == 32
    assert PipelineInput.objects.count() == 1
    created_id = str(PipelineInput.objects.get().pk)
    originals = [r for r in responses if r.status_code == 201 and "Idempotent-Replayed" not in r.headers]
    replays = [r for r in responses if r.status_code == 201 and r.headers.get("Idempotent-Replayed") == "true"]
    conflicts = [r for r in responses if r.status_code == 409]
    assert len(originals) == 1, [r.status_code for r in responses]
    assert len(originals) + len(replays) + len(conflicts) == 32
    assert originals[0].json()["id"] == created_id
    assert all(r.content == originals[0].content for r in replays)
    assert all(r.json()["code"] == "idempotency_key_in_progress" and r.headers["Retry-After"] for r in conflicts)
    # Everyone who was told 409 gets the one input by retrying.
    if conflicts:
        retry = post(requests.Session(), gunicorn_server, "race-key", Authorization=token, Prefer="wait=10")
        assert retry.status_code == 201 and retry.json()["id"] == created_id
