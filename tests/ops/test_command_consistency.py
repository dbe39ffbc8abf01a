"""Every operator command speaks the same way: --help, --json for scripts, one-line errors."""
from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command, load_command_class

from pipeline_ops.models import ApiToken
from pipeline_ops.services.tokens import api_token_digest

COMMANDS = {
    "submit": "pipeline_ops", "retry_failed": "pipeline_ops", "pipeline_status": "pipeline_ops",
    "reconcile": "pipeline_ops", "verify_integrity": "pipeline_ops", "create_api_client": "pipeline_ops",
    "idempotency_purge": "idempotency", "retention_purge": "pipeline_ops",
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_help_and_json_output_when_listed_for_operators(name):
    command = load_command_class(COMMANDS[name], name)
    parser = command.create_parser("manage.py", name)
    options = {opt for action in parser._actions for opt in action.option_strings}

    assert len(command.help) > 40
    assert "--json" in options
    assert all(action.help for action in parser._actions if action.option_strings and action.dest not in {
        "help", "version", "verbosity", "settings", "pythonpath", "traceback", "no_color", "force_color", "skip_checks",
    })


@pytest.mark.django_db
def test_create_api_client_prints_one_json_object_when_json_is_given():
    out = io.StringIO()
    call_command("create_api_client", "ops-json-client", "--json", stdout=out, stderr=io.StringIO())

    created = json.loads(out.getvalue())
    assert created["name"] == "ops-json-client" and created["operator"] is False
    assert ApiToken.objects.get(digest=api_token_digest(token=created["token"])).user_id == created["user_id"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "name, args, message",
    [
        ("reconcile", ["--once", "--interval", "0"], "--interval must be positive"),
        ("verify_integrity", ["--limit", "0"], "--limit must be at least 1"),
        ("idempotency_purge", ["--batch-size", "0"], "--batch-size must be at least 1"),
        ("retention_purge", ["--limit", "0"], "--limit must be at least 1"),
        ("create_api_client", [" "], "must not be empty"),
    ],
)
def test_other_commands_refuse_with_one_line_when_arguments_are_bad(name, args, message):
    with pytest.raises(CommandError, match=message) as caught:
        call_command(name, *args, stdout=io.StringIO(), stderr=io.StringIO())
    assert "\n" not in str(caught.value)
