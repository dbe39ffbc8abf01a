"""API tokens are stored hashed and shown once (issue 13, item 4)."""
from __future__ import annotations

import importlib
from io import StringIO

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from pipeline_ops.models import ApiToken
from tests.admin.helpers import operator

pytestmark = pytest.mark.django_db


def test_token_is_stored_only_as_its_digest_and_the_admin_never_shows_it_when_a_client_is_created():
    out = StringIO()
    call_command("create_api_client", "acme", stdout=out, stderr=StringIO())
    token = out.getvalue().strip()
    root = operator("root", superuser=True)
    client = Client()
    client.force_login(root)

    listing = client.get(reverse("admin:pipeline_ops_apitoken_changelist")).content.decode()
    detail = client.get(reverse("admin:pipeline_ops_apitoken_change", args=[ApiToken.objects.get().pk])).content.decode()

    assert token not in listing and token not in detail
    assert token[:8] + "…" in listing
    assert Token.objects.count() == 0
    assert client.get("/admin/authtoken/tokenproxy/").status_code == 404  # DRF's page that listed tokens in full is gone
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert api.get("/api/v1/pipelines/").status_code == 200
    api.credentials(HTTP_AUTHORIZATION=f"Token {token[:-1]}x")
    assert api.get("/api/v1/pipelines/").status_code == 401


def test_existing_plaintext_tokens_keep_working_and_are_deleted_when_the_migration_hashes_them():
    user = get_user_model().objects.create_user(username="old-client")
    old = Token.objects.create(user=user).key
    migration = importlib.import_module("pipeline_ops.migrations.0004_api_tokens_hashed")

    migration.tokens_hash(apps, None)

    assert Token.objects.count() == 0
    assert ApiToken.objects.get().user == user and ApiToken.objects.get().prefix == old[:8]
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {old}")
    assert api.get("/api/v1/pipelines/").status_code == 200
