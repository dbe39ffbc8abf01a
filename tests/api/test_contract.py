"""Every row of the idempotency contract of POST /api/v1/inputs/, through the front door (APIClient),
on SQLite and PostgreSQL."""
from __future__ import annotations

import json

import pytest
from django.test import override_settings

from idempotency import guard
from idempotency.drf import request_fingerprint
from idempotency.models import IdempotencyRecord
from idempotency.states import RecordStatus
from pipeline_ops.models import PipelineInput, StepRun

from .conftest import submit

pytestmark = pytest.mark.django_db

BODY = {"pipeline": "default", "payload": {"text": "The service was great.", "lang": "en"}}


def problem(response) -> dict:
    assert response["Content-Type"] == "application/problem+json"
    body = json.loads(response.content)
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == response.status_code
    assert body["type"] == f"urn:problem-type:{body['code']}"
    return body


# --- 400: missing or malformed key -----------------------------------------------------------


def test_submit_is_refused_with_400_when_the_key_is_missing(make_client):
    _, _, client = make_client("alice")
    response = submit(client, BODY, key=None)
    assert response.status_code == 400
    assert problem(response)["code"] == "idempotency_key_missing"
    assert PipelineInput.objects.count() == 0 and IdempotencyRecord.objects.count() == 0


@pytest.mark.parametrize("bad_key", ["", "   ", "x" * 256, "tab\there", "bell\x07", '"unterminated', '"bad\\escape"', '""', "caf\u00e9"])
def test_submit_is_refused_with_400_when_the_key_is_malformed(make_client, bad_key):
    _, _, client = make_client("alice")
    response = submit(client, BODY, key=bad_key)
    assert response.status_code == 400
    assert problem(response)["code"] == "idempotency_key_malformed"
    assert PipelineInput.objects.count() == 0 and IdempotencyRecord.objects.count() == 0


def test_quoted_key_is_the_same_key_as_the_bare_form_when_it_is_an_rfc8941_string(make_client):
    _, _, client = make_client("alice")
    first = submit(client, BODY, key='"order-\\"7\\""')
    assert first.status_code == 201
    again = submit(client, BODY, key='order-"7"')
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert IdempotencyRecord.objects.get().key == 'order-"7"'
    assert PipelineInput.objects.count() == 1


def test_key_of_255_characters_is_accepted_when_it_is_at_the_limit(make_client):
    _, _, client = make_client("alice")
    assert submit(client, BODY, key="k" * 255).status_code == 201


# --- 201: the first request, processed once --------------------------------------------------


def test_first_request_creates_one_input_with_its_steps_when_the_key_is_new(make_client):
    user, _, client = make_client("alice")
    response = submit(client, BODY, key="first")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    body = response.json()
    created = PipelineInput.objects.get()
    assert body["id"] == str(created.pk) and body["status"] == "PENDING"
    assert [s["step"] for s in body["steps"]] == ["preprocess", "sentiment", "summarise"]
    assert response["Location"].endswith(f"/api/v1/inputs/{created.pk}/")
    assert created.submitted_by == user and created.idempotency_key == "first" and created.payload == BODY["payload"]
    assert StepRun.objects.filter(input=created).count() == 3
    record = IdempotencyRecord.objects.get()
    assert record.scope == f"api:{user.pk}" and record.status == RecordStatus.COMPLETED
    assert record.result["status"] == 201


# --- replay ------------------------------------------------------------------------------------


def test_same_key_and_body_replays_the_first_response_when_the_first_completed(make_client):
    _, _, client = make_client("alice")
    first = submit(client, BODY, key="same")
    # Same JSON, other key order and whitespace: the canonical fingerprint is equal.
    reordered = json.dumps({"payload": {"lang": "en", "text": "The service was great."}, "pipeline": "default"}, indent=2)
    again = client.post("/api/v1/inputs/", reordered, content_type="application/json", HTTP_IDEMPOTENCY_KEY="same")
    assert again.status_code == first.status_code == 201
    assert again.content == first.content
    assert again["Location"] == first["Location"]
    assert again["Idempotent-Replayed"] == "true"
    assert PipelineInput.objects.count() == 1
    assert IdempotencyRecord.objects.get().replay_count == 1


# --- 409 while the first is running -------------------------------------------------------------


def _hold_key(user, key: str, body: dict):
    """A first request that claimed the key and is still running (its lease is alive)."""
    return guard.claim(
        scope=f"api:{user.pk}", key=key, operation="POST /api/v1/inputs/",
        fingerprint=request_fingerprint(method="POST", path="/api/v1/inputs/", body=body), lease_seconds=60,
    )


def test_same_key_is_refused_with_409_and_retry_after_when_the_first_is_still_running(make_client):
    user, _, client = make_client("alice")
    assert isinstance(_hold_key(user, "busy", BODY), guard.Claimed)
    response = submit(client, BODY, key="busy")
    assert response.status_code == 409
    assert problem(response)["code"] == "idempotency_key_in_progress"
    assert 1 <= int(response["Retry-After"]) <= 60
    assert "Preference-Applied" not in response  # nothing asked to wait, nothing waited
    assert PipelineInput.objects.count() == 0


@override_settings(IDEMPOTENCY={"MAX_WAIT_SECONDS": 1})
def test_prefer_wait_still_answers_409_when_the_first_does_not_finish_within_the_wait(make_client):
    user, _, client = make_client("alice")
    _hold_key(user, "busy", BODY)
    response = submit(client, BODY, key="busy", HTTP_PREFER="wait=30")
    assert response.status_code == 409
    assert problem(response)["code"] == "idempotency_key_in_progress"
    # It did wait before answering, and only as long as the setting allows, not the 30 s asked.
    assert response["Preference-Applied"] == "wait=1"


# --- 422: same key, other request ----------------------------------------------------------


def test_same_key_with_another_body_is_refused_with_422_when_the_key_was_used(make_client):
    _, _, client = make_client("alice")
    assert submit(client, BODY, key="k").status_code == 201
    other = {"pipeline": "default", "payload": {"text": "Something else entirely."}}
    response = submit(client, other, key="k")
    assert response.status_code == 422
    assert problem(response)["code"] == "idempotency_key_reused"
    assert PipelineInput.objects.count() == 1


def test_same_key_while_running_with_another_body_is_refused_with_422_when_bodies_differ(make_client):
    user, _, client = make_client("alice")
    _hold_key(user, "k", BODY)
    response = submit(client, {"pipeline": "llm", "payload": {"text": "other"}}, key="k")
    assert response.status_code == 422


# --- 400 validation: nothing stored, key stays free -------------------------------------------


@pytest.mark.parametrize(
    "body, code, field_code",
    [
        ({"pipeline": "default"}, "validation_error", "required"),
        ({"pipeline": "default", "payload": ["not", "an", "object"]}, "validation_error", "not_an_object"),
        ({"pipeline": "default", "payload": {"lang": "en"}}, "validation_error", "text_required"),
        ({"pipeline": "default", "payload": {"text": "   "}}, "validation_error", "text_required"),
        ({"pipeline": "default", "payload": {"text": "x" * 20_001}}, "validation_error", "text_too_long"),
        ({"pipeline": "default", "payload": {"text": "deep", "n": [[[[[[[[["too deep"]]]]]]]]]}}, "validation_error", "too_deep"),
        ({"pipeline": "default", "payload": {"text": "nul \x00 inside"}}, "validation_error", "null_character"),
        ({"pipeline": "nope", "payload": {"text": "hello"}}, "unknown_pipeline", None),
    ],
)
def test_invalid_request_is_refused_with_400_and_stores_nothing_when_validation_fails(make_client, body, code, field_code):
    _, _, client = make_client("alice")
    response = submit(client, body, key="free")
    assert response.status_code == 400
    details = problem(response)
    assert details["code"] == code
    if field_code:
        assert field_code in {e["code"] for e in details["errors"]}
    assert IdempotencyRecord.objects.count() == 0 and PipelineInput.objects.count() == 0
    # The key is still free: a valid request with it is processed.
    assert submit(client, BODY, key="free").status_code == 201


def test_malformed_json_is_refused_with_400_parse_error_when_the_body_is_not_json(make_client):
    _, _, client = make_client("alice")
    response = client.post("/api/v1/inputs/", "{not json", content_type="application/json", HTTP_IDEMPOTENCY_KEY="k")
    assert response.status_code == 400 and problem(response)["code"] == "parse_error"
    assert IdempotencyRecord.objects.count() == 0


@override_settings(PIPELINE_OPS_API={"MAX_BODY_BYTES": 1000})
def test_large_body_is_refused_with_413_when_it_exceeds_the_limit(make_client):
    _, _, client = make_client("alice")
    response = submit(client, {"pipeline": "default", "payload": {"text": "x" * 2000}}, key="big")
    assert response.status_code == 413 and problem(response)["code"] == "payload_too_large"
    assert IdempotencyRecord.objects.count() == 0


# --- 500: nothing replayable stored, the key may be retried ------------------------------------


def test_server_error_stores_nothing_replayable_and_frees_the_key_when_the_first_fails(make_client, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_OPS_API_FAULTS_DIR", str(tmp_path))
    (tmp_path / "error_before_commit").write_text("")  # fires once, after the input rows were written
    _, _, client = make_client("alice")
    response = submit(client, BODY, key="flaky")
    assert response.status_code == 500
    assert problem(response)["code"] == "server_error"
    assert PipelineInput.objects.count() == 0  # the input's rows were rolled back with the failure
    record = IdempotencyRecord.objects.get()
    assert record.status == RecordStatus.FAILED and record.result is None and record.retry_at is not None
    retry = submit(client, BODY, key="flaky")
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry
    assert PipelineInput.objects.count() == 1
    assert list(record.attempts.order_by("number").values_list("status", flat=True)) == ["FAILED", "SUCCEEDED"]


# --- scoping: two clients, one key value ----------------------------------------------------------


def test_two_clients_get_independent_inputs_when_they_use_the_same_key_value(make_client):
    alice, _, alice_client = make_client("alice")
    bob, _, bob_client = make_client("bob")
    a1 = submit(alice_client, BODY, key="shared")
    b1 = submit(bob_client, BODY, key="shared")
    assert a1.status_code == b1.status_code == 201
    assert "Idempotent-Replayed" not in b1
    assert a1.json()["id"] != b1.json()["id"]
    a2, b2 = submit(alice_client, BODY, key="shared"), submit(bob_client, BODY, key="shared")
    assert a2.content == a1.content and b2.content == b1.content
    assert PipelineInput.objects.filter(submitted_by=alice).count() == 1
    assert PipelineInput.objects.filter(submitted_by=bob).count() == 1
    # A different body from bob with alice's key value is not a mismatch for bob's scope either way.
    assert submit(bob_client, {"pipeline": "llm", "payload": {"text": "b"}}, key="alice-only").status_code == 201
    # Neither can read the other's input.
    assert bob_client.get(f"/api/v1/inputs/{a1.json()['id']}/").status_code == 404


# --- auth and throttling ----------------------------------------------------------------------------


def test_request_is_refused_with_401_problem_when_unauthenticated(db):
    from rest_framework.test import APIClient

    response = APIClient().post("/api/v1/inputs/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="k")
    assert response.status_code == 401
    assert problem(response)["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Token"


@override_settings(PIPELINE_OPS_API={"THROTTLE_RATE": "2/minute"})
def test_client_is_throttled_with_429_and_retry_after_when_over_its_rate(make_client):
    _, _, alice_client = make_client("alice")
    _, _, bob_client = make_client("bob")
    assert alice_client.get("/api/v1/pipelines/").status_code == 200
    assert alice_client.get("/api/v1/pipelines/").status_code == 200
    response = alice_client.get("/api/v1/pipelines/")
    assert response.status_code == 429
    assert problem(response)["code"] == "throttled"
    assert int(response["Retry-After"]) >= 1
    assert bob_client.get("/api/v1/pipelines/").status_code == 200  # per client


def test_unknown_api_path_answers_problem_json_when_no_endpoint_matches(make_client):
    _, _, client = make_client("alice")
    response = client.get("/api/v1/nothing-here/")
    assert response.status_code == 404 and problem(response)["code"] == "not_found"


# --- after the retention period ----------------------------------------------------------------


@pytest.mark.parametrize("hours_later", [25, 31 * 24], ids=["key-forgotten", "history-deleted"])
def test_resubmission_answers_200_with_the_same_input_when_the_key_was_purged(make_client, hours_later):
    from datetime import timedelta

    from django.utils import timezone

    from idempotency.purge import records_purge

    def purge() -> int:
        # Past the key retention (24 h) the key is forgotten; past the history retention (30
        # days) its record is deleted. Either way the key is free, and the input table decides.
        report = records_purge(now=timezone.now() + timedelta(hours=hours_later))
        return report.forgotten + report.deleted

    _, _, client = make_client("alice")
    first = submit(client, BODY, key="old")
    assert purge() == 1
    again = submit(client, BODY, key="old")
    assert again.status_code == 200 and "Idempotent-Replayed" not in again
    assert again.json()["id"] == first.json()["id"]
    other = submit(client, {"pipeline": "default", "payload": {"text": "A different text."}}, key="old2")
    assert other.status_code == 201
    purge()
    reused = submit(client, BODY, key="old2")
    assert reused.status_code == 422 and problem(reused)["code"] == "idempotency_key_reused"
    assert PipelineInput.objects.count() == 2


# --- chunked request bodies (issue 13, item 9) -----------------------------------------------------


def _chunks(data: bytes, size: int = 64 * 1024):
    # A generator body: requests sends it with Transfer-Encoding: chunked and no Content-Length.
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.slow
def test_chunked_body_is_read_and_creates_the_input_when_the_server_dechunks(gunicorn_server, live_client):
    session = live_client("chunky")
    body = json.dumps({"pipeline": "default", "payload": {"text": "sent in chunks"}}).encode()
    response = session.post(f"{gunicorn_server.url}/api/v1/inputs/", data=_chunks(body, 16), timeout=30,
                            headers={"Content-Type": "application/json", "Idempotency-Key": "chunked-1"})

    assert response.request.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in response.request.headers
    assert response.status_code == 201, response.text
    assert PipelineInput.objects.get(idempotency_key="chunked-1").payload == {"text": "sent in chunks"}


@pytest.mark.slow
def test_chunked_body_of_10_mb_is_refused_with_413_problem_when_it_exceeds_the_limit(gunicorn_server, live_client):
    session = live_client("chunky-big")
    body = json.dumps({"pipeline": "default", "payload": {"text": "x" * (10 * 1024 * 1024)}}).encode()
    response = session.post(f"{gunicorn_server.url}/api/v1/inputs/", data=_chunks(body), timeout=60,
                            headers={"Content-Type": "application/json", "Idempotency-Key": "chunked-big"})

    assert response.status_code == 413
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == "payload_too_large"
    assert not PipelineInput.objects.filter(idempotency_key="chunked-big").exists()
    assert IdempotencyRecord.objects.count() == 0


def test_chunked_body_is_refused_with_411_when_the_server_cannot_dechunk(make_client):
    # Django's runserver (the demo) passes no de-chunked body: say so rather than parse nothing.
    _, _, client = make_client("alice")
    body = json.dumps({"pipeline": "default", "payload": {"text": "hi"}})
    response = client.generic("POST", "/api/v1/inputs/", body, content_type="application/json", CONTENT_LENGTH="",
                              HTTP_TRANSFER_ENCODING="chunked", HTTP_IDEMPOTENCY_KEY="chunked-2")
    assert response.status_code == 411 and problem(response)["code"] == "length_required"
    assert PipelineInput.objects.count() == 0
