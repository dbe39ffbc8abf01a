"""idempotency.drf on its own: header parsing, fingerprints, and the mixin and decorator on views
of a project without pipelines (tests/api/reusable_urls.py, tests.testapp.Receipt)."""
from __future__ import annotations

import pytest
from django.test import override_settings

from idempotency.drf import parse_idempotency_key, parse_prefer_wait, request_fingerprint
from idempotency.errors import KeyMalformedError, KeyMissingError
from idempotency.models import IdempotencyRecord
from tests.testapp.models import Receipt


@pytest.mark.parametrize(
    "raw, key",
    [("abc", "abc"), ('"abc"', "abc"), ('  "a b"  ', "a b"), ('"say \\"hi\\""', 'say "hi"'), ('"back\\\\slash"', "back\\slash"),
     ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"), ("x" * 255, "x" * 255)],
)
def test_key_is_parsed_when_it_is_bare_or_an_rfc8941_string(raw, key):
    assert parse_idempotency_key(raw) == key


@pytest.mark.parametrize("raw", ["", "  ", '""', '" "', "x" * 256, '"' + "x" * 256 + '"', "a\x00b", "\u00e9", '"abc', '"a"b"', '"\\n"'])
def test_key_is_refused_when_it_is_malformed(raw):
    with pytest.raises(KeyMalformedError):
        parse_idempotency_key(raw)


def test_key_is_refused_as_missing_when_there_is_no_header():
    with pytest.raises(KeyMissingError):
        parse_idempotency_key(None)


@pytest.mark.parametrize(
    "raw, seconds",
    [(None, 0), ("", 0), ("wait=5", 5), ("respond-async, wait=3", 3), ("wait=3; foo=bar", 3), ('wait="4"', 4), ("wait=999", 10), ("wait=-1", 0), ("wait=soon", 0), ("return=minimal", 0)],
)
def test_prefer_wait_is_parsed_and_capped_when_present(raw, seconds):
    assert parse_prefer_wait(raw, cap=10) == seconds


@override_settings(IDEMPOTENCY={"MAX_WAIT_SECONDS": 2})
def test_prefer_wait_is_capped_by_the_setting_when_no_cap_is_given():
    assert parse_prefer_wait("wait=60") == 2


def test_fingerprint_ignores_key_order_and_sees_values_when_bodies_are_compared():
    a = request_fingerprint(method="post", path="/x/", body={"a": 1, "b": {"c": [1, 2]}})
    assert a == request_fingerprint(method="POST", path="/x/", body={"b": {"c": [1, 2]}, "a": 1})
    assert a != request_fingerprint(method="POST", path="/x/", body={"a": 1, "b": {"c": [2, 1]}})
    assert a != request_fingerprint(method="POST", path="/y/", body={"a": 1, "b": {"c": [1, 2]}})
    assert a != request_fingerprint(method="PUT", path="/x/", body={"a": 1, "b": {"c": [1, 2]}})


# --- the mixin and the decorator on someone else's views ---------------------------------------



@pytest.fixture
def client(make_client):
    return make_client("shop")[2]


@pytest.mark.django_db
@pytest.mark.urls("tests.api.reusable_urls")
def test_mixin_charges_once_and_replays_when_a_foreign_view_is_retried(client):
    first = client.post("/charges/", {"amount": 5}, format="json", HTTP_IDEMPOTENCY_KEY="c1")
    again = client.post("/charges/", {"amount": 5}, format="json", HTTP_IDEMPOTENCY_KEY="c1")
    assert first.status_code == again.status_code == 201
    assert again.content == first.content and again["Location"] == first["Location"]
    assert again["Idempotent-Replayed"] == "true"
    assert Receipt.objects.count() == 1
    other = client.post("/charges/", {"amount": 6}, format="json", HTTP_IDEMPOTENCY_KEY="c1")
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"


@pytest.mark.django_db
@pytest.mark.urls("tests.api.reusable_urls")
def test_mixin_rolls_back_and_frees_the_key_when_the_work_raises_or_answers_an_error(client):
    crashed = client.post("/charges/", {"amount": 13}, format="json", HTTP_IDEMPOTENCY_KEY="c2")
    assert crashed.status_code == 500 and crashed.json()["code"] == "server_error"
    refused = client.post("/charges/", {"amount": 404}, format="json", HTTP_IDEMPOTENCY_KEY="c3")
    assert refused.status_code == 404 and "Idempotent-Replayed" not in refused
    assert Receipt.objects.count() == 0  # both writes rolled back
    assert set(IdempotencyRecord.objects.values_list("status", flat=True)) == {"FAILED"}
    # Both keys are free again at once: a retry runs the work again (no 409, no replay of the error).
    assert client.post("/charges/", {"amount": 13 + 0}, format="json", HTTP_IDEMPOTENCY_KEY="c2").status_code == 500
    assert client.post("/charges/", {"amount": 404}, format="json", HTTP_IDEMPOTENCY_KEY="c3").status_code == 404
    assert Receipt.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.urls("tests.api.reusable_urls")
def test_mixin_stores_nothing_when_validation_fails_before_the_guard(client):
    response = client.post("/charges/", {"amount": 0}, format="json", HTTP_IDEMPOTENCY_KEY="c4")
    assert response.status_code == 400 and response.json()["code"] == "validation_error"
    assert IdempotencyRecord.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.urls("tests.api.reusable_urls")
def test_decorator_guards_the_whole_handler_when_applied_to_a_view_method(client):
    first = client.post("/refunds/", {"amount": 5}, format="json", HTTP_IDEMPOTENCY_KEY="r1")
    again = client.post("/refunds/", {"amount": 5}, format="json", HTTP_IDEMPOTENCY_KEY="r1")
    assert first.status_code == 201 and again["Idempotent-Replayed"] == "true" and again.content == first.content
    assert Receipt.objects.filter(key="refund:r1").count() == 1
    missing = client.post("/refunds/", {"amount": 5}, format="json")
    assert missing.status_code == 400 and missing.json()["code"] == "idempotency_key_missing"


@pytest.mark.django_db
@pytest.mark.urls("tests.api.reusable_urls")
def test_late_request_is_fenced_and_its_write_rolled_back_when_a_newer_attempt_took_the_key(client):
    response = client.post("/charges/", {"amount": 77}, format="json", HTTP_IDEMPOTENCY_KEY="late")
    assert response.status_code == 409 and response.json()["code"] == "idempotency_key_in_progress"
    assert Receipt.objects.count() == 0
    record = IdempotencyRecord.objects.get()
    assert record.status == "PROCESSING" and record.attempt_count == 2  # the newer attempt holds it
    assert list(record.attempts.order_by("number").values_list("status", flat=True)) == ["FENCED", "RUNNING"]


@pytest.mark.django_db
@pytest.mark.urls("tests.api.reusable_urls")
def test_late_request_answers_with_the_winners_response_when_the_newer_attempt_completed_first(client):
    response = client.post("/charges/", {"amount": 78}, format="json", HTTP_IDEMPOTENCY_KEY="late")
    assert response.status_code == 201 and response.json() == {"receipt": "the winner"}
    assert response["Idempotent-Replayed"] == "true"
    assert Receipt.objects.count() == 0
    assert list(IdempotencyRecord.objects.get().attempts.order_by("number").values_list("status", flat=True)) == ["FENCED", "SUCCEEDED"]
