"""A worker on a host whose clock is off: one OS process of the clock-skew test (test_db_faults.py),
not a test itself. Started under libfaketime (``FAKETIME=+120s``) against the *test* database.

It proves its clock really is off (host time against the database's), then, round after round,
delivers the step run's task again and runs the reconciler, exactly as a second worker and the
reconciler schedule would, and prints one JSON line per round. The step it registers has the
parent's name: if it were ever wrongly given the key, its call would be recorded as
``"by": "skewed child"`` and the parent would see it.
"""
from __future__ import annotations

import json
import sys
import time

import django

MARK = "SKEW "


def say(payload: dict) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def main() -> None:
    command = json.loads(sys.argv[1])
    django.setup()
    from django.conf import settings
    from django.utils import timezone

    from idempotency.clock import db_now
    from idempotency.policy import RetryPolicy
    from pipeline_ops.reconciler import reconcile_once
    from pipeline_ops.steps import Step, is_transient, step_register
    from pipeline_ops.tasks import step_run_execute_task

    settings.PIPELINES = {**settings.PIPELINES, command["pipeline"]: {"steps": [command["step"]], "description": "skew test"}}
    step_register(Step(
        name=command["step"], func=lambda ctx: {"by": "skewed child"}, lease_seconds=command["lease"],
        policy=RetryPolicy(max_attempts=3, backoff_base_seconds=0.0, is_transient=is_transient),
    ), replace_existing=True)
    say({"host_ahead_seconds": (timezone.now() - db_now()).total_seconds()})
    for number in range(command["rounds"]):
        outcome = step_run_execute_task(command["step_run_id"])
        report = reconcile_once()
        say({"round": number, "outcome": outcome, "expired_leases": report.expired_leases,
             "due_retries": report.due_retries, "lost": report.lost})
        time.sleep(command["pause"])
    say({"done": True})


if __name__ == "__main__":
    main()
