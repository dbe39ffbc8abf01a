"""The keyed POST's statement budget, as a ceiling (the guarded step's: tests/pipeline/
test_statement_budget.py). Counted with Django's own query capture through ``APIClient``."""
from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from .conftest import submit

pytestmark = pytest.mark.django_db(transaction=True)

# The token lookup, the claim (one statement), then one transaction: the input, its steps, the
# first step's queue row, the steps read back for the response, the completion of the key.
KEYED_POST_BUDGET = {"postgresql": 10, "sqlite": 13}


def test_keyed_post_stays_within_its_statement_budget_when_the_key_is_new(make_client):
    _, _, client = make_client("budget")
    assert submit(client, key="warm-up").status_code == 201  # first-use costs (content types, …)
    with CaptureQueriesContext(connection) as statements:
        response = submit(client, key="budget-1")
    assert response.status_code == 201
    assert len(statements) <= KEYED_POST_BUDGET[connection.vendor], "\n".join(q["sql"][:160] for q in statements.captured_queries)
