"""Benchmark (not a test): an operator's "Retry safely" on many failed steps, through the admin.

On a scratch PostgreSQL database (created, migrated, dropped at the end) with N inputs whose
first step failed for good, it measures, through the full admin request (Django's test client
with a logged-in superuser, the confirmation's second POST):

  * baseline A: the action worked through inside the request (the threshold set above K);
  * candidate B: the same action on the same K targets in the background (the request plans,
    records the action and queues its first slice);
  interleaved A B A B ... for --rounds rounds (the targets are reset to failed between runs),
  medians reported;
  * then, on all N targets ("select all"): the confirmation page (which plans every target) and
    the background request (medians of 3), and the time the slices take to finish when run back
    to back in this process (a worker's part), with the summary.

    .venv/bin/python bench/bulk_actions.py [--inputs 10000] [--k 500] [--rounds 3]
        [--database-url postgres://postgres@127.0.0.1:5432/postgres]

Ends with ``RATIO bulk_request_foreground_over_background_<K> <value>`` (how many times longer
the operator waits for the request when the work is done in it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=500, help="Targets of the interleaved foreground/background rounds.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--broker", choices=("postgres", "orm"), default="postgres",
                        help="the table broker the enqueues go to (default: postgres, the default on PostgreSQL)")
    args = parser.parse_args()
    if args.rounds < 3:
        raise SystemExit("bench/bulk_actions.py: --rounds must be at least 3")

    from bench.scratch import scratch_database

    with scratch_database(args.database_url, name=f"bench_bulk_{os.getpid()}", script="bench/bulk_actions.py"):
        os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
        os.environ["DJANGO_SETTINGS_MODULE"] = "pipeline_ops.settings"
        os.environ["PIPELINE_OPS_BROKER"] = args.broker
        os.environ["PIPELINE_OPS_QUEUE"] = f"bench-bulk-{os.getpid()}"
        os.environ["ALLOWED_HOSTS"] = "testserver"
        return run(args)


def run(args) -> int:
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client
    from django.urls import reverse
    from django.utils import timezone
    from django_q.models import OrmQ

    from idempotency.models import IdempotencyRecord
    from idempotency.states import RecordStatus
    from pipeline_ops.models import BulkAction, OperatorAction, StepRun
    from pipeline_ops.services.bulk import bulk_run_slice
    from pipeline_ops.states import StepStatus

    call_command("migrate", verbosity=0)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        for i in range(args.inputs):
            handle.write(json.dumps({"id": f"bulk-{i}", "text": f"Document {i}. It is fine."}) + "\n")
    started = time.perf_counter()
    call_command("submit", handle.name, "--scope", "bench", stdout=open(os.devnull, "w"))
    print(f"setup: {args.inputs} inputs submitted in {time.perf_counter() - started:.1f} s")

    firsts = [(pk, f"{input_id}:{step}") for pk, input_id, step in
              StepRun.objects.filter(position=0).order_by("pk").values_list("pk", "input_id", "step")]
    now = timezone.now()
    records = IdempotencyRecord.objects.bulk_create([
        IdempotencyRecord(scope="step", key=key, operation="step:preprocess", fingerprint="bench", status=RecordStatus.FAILED,
                          attempt_count=1, error_summary="ConnectionError: 503", expires_at=now + timezone.timedelta(days=1))
        for _, key in firsts
    ], batch_size=2000)
    assert len(records) == len(firsts)
    ids = [pk for pk, _ in firsts]

    def reset() -> None:
        """Every first step failed for good again, nothing queued, no audit, no background action."""
        StepRun.objects.filter(pk__in=ids).update(status=StepStatus.FAILED, attempts_used=1, last_error="ConnectionError: 503",
                                                  next_attempt_at=None, finished_at=now)
        IdempotencyRecord.objects.filter(scope="step").update(status=RecordStatus.FAILED, retry_at=None)
        OrmQ.objects.all().delete()
        OperatorAction.objects.all().delete()
        BulkAction.objects.all().delete()

    from django.db import connection

    with connection.cursor() as cursor:  # each first step linked to its failed key, in one statement
        cursor.execute(
            f"UPDATE {StepRun._meta.db_table} s SET idempotency_record_id = r.id FROM {IdempotencyRecord._meta.db_table} r"
            " WHERE r.scope = 'step' AND r.key = s.input_id::text || ':' || s.step AND s.position = 0"
        )
    reset()

    user = get_user_model().objects.create_superuser("bench", "bench@example.com", "x")
    client = Client()
    client.force_login(user)
    url = reverse("admin:pipeline_ops_steprun_changelist")
    settings.PIPELINE_OPS_RETRY_RATE = 0

    def post(targets: list[int] | None) -> tuple[float, int]:
        """The confirmation's POST: the ticked targets, or (None) "select all" on the failed steps'
        list, as an operator selects thousands (one id and select_across, the filter in the URL)."""
        if targets is None:
            form = {"action": "retry_steps", "_selected_action": ids[:1], "select_across": "1", "post": "yes", "reason": "bench"}
            target_url = url + "?status__exact=FAILED"
        else:
            form = {"action": "retry_steps", "_selected_action": targets, "post": "yes", "reason": "bench"}
            target_url = url
        began = time.perf_counter()
        response = client.post(target_url, form)
        return time.perf_counter() - began, response.status_code

    foreground, background = [], []
    k_ids = ids[: args.k]
    for number in range(args.rounds):
        settings.PIPELINE_OPS_BULK_THRESHOLD = 10**9
        seconds, status = post(k_ids)
        assert status == 302 and StepRun.objects.filter(pk__in=k_ids, status=StepStatus.QUEUED).count() == len(k_ids)
        foreground.append(seconds)
        reset()
        settings.PIPELINE_OPS_BULK_THRESHOLD = 200
        seconds, status = post(k_ids)
        assert status == 302 and BulkAction.objects.count() == 1 and not OperatorAction.objects.exists()
        background.append(seconds)
        reset()
        print(f"round {number + 1}: {args.k} targets, in the request {foreground[-1]:.2f} s, in the background {background[-1] * 1000:.0f} ms")

    confirmations = []  # the first POST: the confirmation page, which plans every target
    for _ in range(3):
        began = time.perf_counter()
        page = client.post(url + "?status__exact=FAILED", {"action": "retry_steps", "_selected_action": ids[:1], "select_across": "1"})
        confirmations.append(time.perf_counter() - began)
        assert page.status_code == 200 and f"{len(ids)} selected: this runs in the background" in page.content.decode()
    requests = []
    for _ in range(3):
        seconds, status = post(None)
        assert status == 302 and BulkAction.objects.get().total == len(ids), status
        requests.append(seconds)
        if len(requests) < 3:
            reset()
    bulk = BulkAction.objects.get()
    began = time.perf_counter()
    slices = 0
    while True:
        OrmQ.objects.all().delete()  # the ack of the slice's task, as a worker does
        after = bulk_run_slice(bulk_id=bulk.pk)
        slices += 1
        if after is None or after.status != BulkAction.Status.RUNNING:
            break
    finish = time.perf_counter() - began
    bulk.refresh_from_db()

    fg, bg = statistics.median(foreground), statistics.median(background)
    print(f"median, {args.k} targets: in the request {fg:.2f} s; in the background {bg * 1000:.0f} ms")
    print(f"confirmation page of {len(ids)} targets (select all): median {statistics.median(confirmations) * 1000:.0f} ms")
    print(f"background request on {len(ids)} targets: median {statistics.median(requests) * 1000:.0f} ms (of {[round(r, 2) for r in requests]})")
    print(f"its {slices} slices finished in {finish:.1f} s ({finish / len(ids) * 1000:.1f} ms a target): {bulk.status}, {bulk.message}")
    print(f"RATIO bulk_request_foreground_over_background_{args.k} {fg / bg:.1f}")
    return 0 if bulk.status == BulkAction.Status.DONE else 1


if __name__ == "__main__":
    raise SystemExit(main())
