"""Reads (list with filters and cursor pagination, detail with outputs and attempts, pipelines) and the
operators' actions (retry, cancel) through the API, behind their permissions."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from pipeline_ops.models import OperatorAction, PipelineInput, StepRun
from pipeline_ops.states import InputStatus, StepStatus
from pipeline_ops.tasks import step_run_execute_task
from tests.admin.helpers import fail_step

from .conftest import submit

pytestmark = pytest.mark.django_db


def _submit(client, key: str, *, pipeline: str = "default", text: str = "A fine day. The sun was out and everyone smiled.") -> dict:
    response = submit(client, {"pipeline": pipeline, "payload": {"text": text}}, key=key)
    assert response.status_code == 201, response.content
    return response.json()


def test_pipelines_are_listed_with_their_steps_when_asked(make_client):
    _, _, client = make_client("alice")
    response = client.get("/api/v1/pipelines/")
    assert response.status_code == 200
    by_name = {p["name"]: p for p in response.json()}
    assert by_name["default"]["steps"] == ["preprocess", "sentiment", "summarise"]
    assert by_name["llm"]["steps"][-1] == "llm"


def test_list_shows_only_the_clients_own_inputs_when_it_is_not_an_operator(make_client):
    _, _, alice = make_client("alice")
    _, _, bob = make_client("bob")
    _, _, ops = make_client("ops", operator=True)
    mine = _submit(alice, "a1")
    _submit(bob, "b1")
    assert [i["id"] for i in alice.get("/api/v1/inputs/").json()["results"]] == [mine["id"]]
    assert len(ops.get("/api/v1/inputs/").json()["results"]) == 2


def test_list_filters_by_status_pipeline_and_created_range_when_given(make_client):
    _, _, client = make_client("alice")
    first = _submit(client, "k1", pipeline="default")
    second = _submit(client, "k2", pipeline="llm")
    PipelineInput.objects.filter(pk=first["id"]).update(status=InputStatus.FAILED, created_at=timezone.now() - timedelta(days=2))

    def ids(**params):
        response = client.get("/api/v1/inputs/", params)
        assert response.status_code == 200, response.content
        return [i["id"] for i in response.json()["results"]]

    assert ids(status="FAILED") == [first["id"]]
    assert ids(pipeline="llm") == [second["id"]]
    assert ids(created_after=(timezone.now() - timedelta(days=1)).isoformat()) == [second["id"]]
    assert ids(created_before=(timezone.now() - timedelta(days=1)).isoformat()) == [first["id"]]
    bad = client.get("/api/v1/inputs/", {"status": "EXPLODED"})
    assert bad.status_code == 400 and bad.json()["code"] == "validation_error"


def test_list_pages_with_a_cursor_when_there_are_more_inputs_than_a_page(make_client):
    _, _, client = make_client("alice")
    created = [_submit(client, f"k{i}")["id"] for i in range(5)]
    seen, url = [], "/api/v1/inputs/?page_size=2"
    while url:
        page = client.get(url).json()
        assert len(page["results"]) <= 2
        seen.extend(i["id"] for i in page["results"])
        url = page["next"]
    assert sorted(seen) == sorted(created) and len(seen) == 5


def test_detail_shows_step_outputs_and_attempts_when_the_pipeline_ran(make_client):
    _, _, client = make_client("alice")
    input_id = _submit(client, "run")["id"]
    for _ in range(3):  # be the worker: run each queued step with the real runner
        queued = StepRun.objects.filter(input_id=input_id, status=StepStatus.QUEUED).first()
        step_run_execute_task(queued.pk)
    response = client.get(f"/api/v1/inputs/{input_id}/")
    assert response.status_code == 200
    detail = response.json()
    assert detail["status"] == "SUCCEEDED"
    assert [s["status"] for s in detail["steps"]] == ["SUCCEEDED"] * 3
    assert all(s["output"] is not None and [a["status"] for a in s["attempts"]] == ["SUCCEEDED"] for s in detail["steps"])
    assert detail["attempt_summary"] == {"total": 3, "by_status": {"SUCCEEDED": 3}}
    assert detail["errors"] == []


def test_detail_lists_the_errors_when_a_step_failed(make_client):
    _, _, client = make_client("alice")
    input_id = _submit(client, "fails")["id"]
    fail_step(StepRun.objects.get(input_id=input_id, position=0), error=ConnectionError("provider returned 503"))
    detail = client.get(f"/api/v1/inputs/{input_id}/").json()
    assert detail["status"] == "FAILED"
    assert detail["errors"] == [
        {"step": "preprocess", "attempt": 1, "status": "FAILED", "error_type": "ConnectionError",
         "error_message": "provider returned 503", "at": detail["errors"][0]["at"]}
    ]
    assert detail["attempt_summary"]["by_status"] == {"FAILED": 1}


def test_detail_is_404_when_the_input_is_another_clients_or_missing(make_client):
    _, _, alice = make_client("alice")
    _, _, bob = make_client("bob")
    input_id = _submit(alice, "mine")["id"]
    for response in (bob.get(f"/api/v1/inputs/{input_id}/"), alice.get("/api/v1/inputs/00000000-0000-0000-0000-000000000000/")):
        assert response.status_code == 404
        assert response["Content-Type"] == "application/problem+json" and response.json()["code"] == "not_found"


# --- operators' actions -----------------------------------------------------------------------------


def test_retry_and_cancel_are_refused_with_403_when_the_client_lacks_the_permission(make_client):
    _, _, client = make_client("alice")
    input_id = _submit(client, "k")["id"]
    for action in ("retry", "cancel"):
        response = client.post(f"/api/v1/inputs/{input_id}/{action}/", {"reason": "why not"}, format="json")
        assert response.status_code == 403 and response.json()["code"] == "permission_denied"
    assert OperatorAction.objects.count() == 0


def test_retry_queues_the_failed_step_and_audits_it_when_an_operator_asks(make_client):
    _, _, client = make_client("alice")
    ops_user, _, ops = make_client("ops", operator=True)
    input_id = _submit(client, "k")["id"]
    fail_step(StepRun.objects.get(input_id=input_id, position=0))
    response = ops.post(f"/api/v1/inputs/{input_id}/retry/", {"reason": "provider is back"}, format="json")
    assert response.status_code == 200, response.content
    report = response.json()
    assert (report["done"], report["skipped"], report["message"]) == (1, 0, "1 queued")
    assert StepRun.objects.get(input_id=input_id, position=0).status == StepStatus.QUEUED
    audit = OperatorAction.objects.get()
    assert (audit.actor, audit.source, audit.reason) == (ops_user, "api", "provider is back")


def test_retry_is_a_no_op_that_says_why_when_nothing_needs_retrying(make_client):
    _, _, ops = make_client("ops", operator=True)
    input_id = _submit(ops, "k")["id"]
    report = ops.post(f"/api/v1/inputs/{input_id}/retry/", {"reason": "just in case"}, format="json").json()
    assert report["done"] == 0 and report["skipped"] == 1
    assert "already queued" in report["message"]


def test_retry_needs_a_reason_when_asked_without_one(make_client):
    _, _, ops = make_client("ops", operator=True)
    input_id = _submit(ops, "k")["id"]
    response = ops.post(f"/api/v1/inputs/{input_id}/retry/", {}, format="json")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "reason"


def test_cancel_cancels_an_unfinished_input_once_when_an_operator_asks_twice(make_client):
    _, _, ops = make_client("ops", operator=True)
    input_id = _submit(ops, "k")["id"]
    first = ops.post(f"/api/v1/inputs/{input_id}/cancel/", {"reason": "submitted by mistake"}, format="json").json()
    assert first["done"] == 1 and first["input"]["status"] == "CANCELLED"
    assert {s["status"] for s in first["input"]["steps"]} == {"CANCELLED"}
    second = ops.post(f"/api/v1/inputs/{input_id}/cancel/", {"reason": "again"}, format="json").json()
    assert second["done"] == 0 and second["message"] == "0 cancelled, 1 skipped: already cancelled"
    assert OperatorAction.objects.count() == 2


def test_browsable_api_serves_html_when_a_session_user_asks_for_it(client, django_user_model):
    user = django_user_model.objects.create_user("browser")
    client.force_login(user)  # session authentication, as from the admin login
    for url in ("/api/v1/inputs/", "/api/v1/pipelines/"):
        response = client.get(url, HTTP_ACCEPT="text/html")
        assert response.status_code == 200 and response["Content-Type"].startswith("text/html")
    missing = client.get("/api/v1/inputs/00000000-0000-0000-0000-000000000000/", HTTP_ACCEPT="text/html")
    assert missing.status_code == 404 and missing["Content-Type"] == "application/problem+json"
