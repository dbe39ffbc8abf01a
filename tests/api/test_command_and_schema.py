"""create_api_client, and the OpenAPI schema and its interactive docs (served offline)."""
from __future__ import annotations

from io import StringIO

import pytest
import yaml
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from pipeline_ops.models import ApiToken
from pipeline_ops.services.tokens import api_token_digest
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def test_create_api_client_prints_a_working_token_once_when_the_name_is_new():
    out, err = StringIO(), StringIO()
    call_command("create_api_client", "acme", stdout=out, stderr=err)
    token = out.getvalue().strip()
    user = get_user_model().objects.get(username="acme")
    stored = ApiToken.objects.get(user=user)
    assert stored.digest == api_token_digest(token=token) and token not in (stored.digest, stored.prefix)
    assert not user.has_usable_password()
    assert "shown only once" in err.getvalue()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/pipelines/").status_code == 200


def test_create_api_client_fails_with_command_error_when_the_name_exists():
    call_command("create_api_client", "acme", stdout=StringIO(), stderr=StringIO())
    with pytest.raises(CommandError, match="already exists"):
        call_command("create_api_client", "acme", stdout=StringIO(), stderr=StringIO())
    assert ApiToken.objects.count() == 1


def test_create_api_client_fails_with_command_error_when_the_name_is_invalid():
    with pytest.raises(CommandError, match="Invalid client name"):
        call_command("create_api_client", "no spaces allowed!", stdout=StringIO(), stderr=StringIO())
    assert get_user_model().objects.count() == 0


def test_create_api_client_grants_the_operators_permissions_when_asked():
    call_command("create_api_client", "ops", "--operator", stdout=StringIO(), stderr=StringIO())
    user = get_user_model().objects.get(username="ops")
    assert user.has_perm("pipeline_ops.retry_steprun") and user.has_perm("pipeline_ops.cancel_pipelineinput")


def test_schema_documents_the_idempotency_contract_when_fetched():
    response = APIClient().get("/api/schema/")
    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    assert "Idempotent-Replayed: true" in schema["info"]["description"]
    create = schema["paths"]["/api/v1/inputs/"]["post"]
    assert {p["name"] for p in create["parameters"]} >= {"Idempotency-Key", "Prefer"}
    assert {"201", "400", "409", "413", "422", "429"} <= set(create["responses"])
    assert "application/problem+json" in create["responses"]["409"]["content"]
    assert {"/api/v1/inputs/{input_id}/", "/api/v1/inputs/{input_id}/retry/", "/api/v1/inputs/{input_id}/cancel/", "/api/v1/pipelines/"} <= set(schema["paths"])


def test_docs_page_loads_its_assets_locally_when_served_offline():
    response = APIClient().get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html and "/static/drf_spectacular_sidecar/" in html
    assert "cdn" not in html.lower()
