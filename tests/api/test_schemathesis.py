"""The contract fuzzed: schemathesis generates requests from the live OpenAPI schema (served by the
app itself, in-process over WSGI) and checks every response: no 5xx, status codes, content types,
headers and bodies as documented."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from django.core.signals import request_finished, request_started
from django.db import close_old_connections

from pipeline_ops.wsgi import application

# Every check schemathesis has runs, but one: "schema-valid data is accepted". The contract refuses
# some schema-valid requests on purpose, for reasons a schema cannot express: the same key with
# another body (422), a payload nested deeper than MAX_JSON_DEPTH or carrying U+0000 (400).
# Those answers are declared in the schema, and status/content-type/body conformance still apply.
from schemathesis.checks import positive_data_acceptance  # noqa: E402

EXAMPLES_PER_OPERATION = 25


@pytest.fixture
def wsgi_in_test_transaction():
    # As Django's test client does: the WSGI handler would close the test's connection (and its
    # open transaction) at the end of every request.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.mark.django_db
def test_every_response_conforms_to_the_schema_when_requests_are_generated_from_it(make_client, wsgi_in_test_transaction):
    _, token, _ = make_client("fuzzer", operator=True)
    headers = {"Authorization": f"Token {token}"}
    schema = schemathesis.openapi.from_wsgi("/api/schema/", application)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /api/v1/inputs/", "GET /api/v1/inputs/", "GET /api/v1/pipelines/"}
    tested = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def conforms(case):
            response = case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])
            assert response.status_code < 500, response.text

        conforms()
        tested.append(operation.label)
    assert len(tested) == len(operations)
