"""The project's URLs plus two test-only twins of ``POST /api/v1/inputs/`` whose work the test
holds at a gate: the request claims its key, then waits, alive, until the test lets it go (or
SIGKILLs it). Served only by the liveness tests' gunicorn (``tests.api.liveness_settings``).

A gate is a file protocol in ``LIVENESS_GATES_DIR``: the test creates ``<key>.block``; the first
request with that key to reach the gate renames it away (exactly one process can), writes
``<key>.entered`` (its pid and attempt) and waits until ``<key>.release`` exists. Every other
request passes straight through.
"""
from __future__ import annotations

import json
import os
import time

from django.urls import path

from pipeline_ops.api.views import InputListCreateApi
from pipeline_ops.urls import handler404, handler500  # noqa: F401 - the project's error pages
from pipeline_ops.urls import urlpatterns as project_urlpatterns

GATE_TIMEOUT_SECONDS = 120  # a forgotten gate must not hold a worker forever


def gate(key: str, attempt) -> None:
    directory = os.environ.get("LIVENESS_GATES_DIR", "")
    if not directory:
        return
    base = os.path.join(directory, key)
    try:
        os.rename(f"{base}.block", f"{base}.blocked")
    except FileNotFoundError:
        return
    with open(f"{base}.entered.tmp", "w") as entered:
        json.dump({"pid": os.getpid(), "attempt": str(attempt.pk)}, entered)
    os.rename(f"{base}.entered.tmp", f"{base}.entered")
    deadline = time.monotonic() + GATE_TIMEOUT_SECONDS
    while not os.path.exists(f"{base}.release") and time.monotonic() < deadline:
        time.sleep(0.02)


class GatedInputApi(InputListCreateApi):
    def idempotency_claimed(self, request, attempt) -> None:
        gate(request.headers["Idempotency-Key"], attempt)
        super().idempotency_claimed(request, attempt)


class ShortLeaseGatedInputApi(GatedInputApi):
    idempotency_lease_seconds = 3


urlpatterns = [
    path("_test/gated/inputs/", GatedInputApi.as_view()),
    path("_test/gated-short-lease/inputs/", ShortLeaseGatedInputApi.as_view()),
    *project_urlpatterns,
]
