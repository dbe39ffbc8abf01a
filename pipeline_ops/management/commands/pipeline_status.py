import json as json_module
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from idempotency.states import AttemptStatus
from pipeline_ops.selectors.dashboard import (
    attempts_count_by_status,
    cluster_heartbeats,
    inputs_count_by_status,
    leases_summary,
    queue_depth,
    step_failure_rates,
    workers_seen,
)


class Command(BaseCommand):
    help = (
        "Print what operators watch: inputs by status, failure rate per step, attempts by outcome "
        "(unknown outcomes, fenced late writes), stuck leases and the oldest PROCESSING age, queue "
        "depth, cluster heartbeats and the workers seen recently. --json for scripts."
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print one JSON object on stdout.")
        parser.add_argument(
            "--workers-window", type=float, default=15, metavar="MINUTES",
            help="List workers that started an attempt in the last MINUTES (default: %(default)s).",
        )

    def handle(self, *args, json, workers_window, **options):
        if workers_window <= 0:
            raise CommandError("--workers-window must be more than 0 minutes.")
        now = timezone.now()
        status = self._collect(now=now, window=timedelta(minutes=workers_window))
        if json:
            self.stdout.write(json_module.dumps(status, default=str))
            return
        self._print(status)

    @staticmethod
    def _collect(*, now, window) -> dict:
        attempts = attempts_count_by_status()
        leases = leases_summary(now=now)
        queue = queue_depth()
        return {
            "time": now.isoformat(),
            "inputs": inputs_count_by_status(),
            "inputs_last_hour": inputs_count_by_status(since=now - timedelta(hours=1)),
            "steps": [
                {"step": r.step, "succeeded": r.succeeded, "failed": r.failed, "active": r.active,
                 "failure_rate": None if r.rate is None else round(r.rate, 4),
                 # By attempts, as the dashboard counts it: a step that failed 79 times and then
                 # succeeded is not a 0 % step.
                 "attempts": r.attempts, "attempts_failed": r.attempts_failed,
                 "attempt_failure_rate": None if r.attempt_rate is None else round(r.attempt_rate, 4)}
                for r in step_failure_rates()
            ],
            "attempts": attempts,
            "unknown_outcomes": attempts.get(AttemptStatus.UNKNOWN, 0),
            "fenced_late_writes": attempts.get(AttemptStatus.FENCED, 0),
            "leases": {
                "processing": leases.processing,
                "stuck": leases.stuck,
                "oldest_processing_age_seconds": None if leases.oldest_processing_age_seconds is None
                else round(leases.oldest_processing_age_seconds, 3),
            },
            "queue": {"broker": queue.broker, "ready": queue.ready, "in_flight": queue.in_flight, "error": queue.error or None},
            "clusters": [
                {"cluster_id": c.cluster_id, "host": c.host, "status": c.status, "workers": c.workers,
                 "age_seconds": None if c.age_seconds is None else round(c.age_seconds, 3)}
                for c in cluster_heartbeats(now=now)
            ],
            "workers_seen": [
                {"worker": worker, "last_started_at": last.isoformat()} for worker, last in workers_seen(since=now - window)
            ],
            "workers_window_minutes": window.total_seconds() / 60,
        }

    def _print(self, s: dict) -> None:
        write = self.stdout.write
        write(f"pipeline status at {s['time']}")
        write("inputs     " + "  ".join(f"{k.lower()} {v}" for k, v in s["inputs"].items())
              + f"   (last hour: {sum(s['inputs_last_hour'].values())})")
        write("steps      step             succeeded   failed   active   failure rate   attempts  failed  by attempts")
        for r in s["steps"]:
            rate = "-" if r["failure_rate"] is None else f"{r['failure_rate']:.1%}"
            by_attempts = "-" if r["attempt_failure_rate"] is None else f"{r['attempt_failure_rate']:.1%}"
            write(f"           {r['step']:<16} {r['succeeded']:>9} {r['failed']:>8} {r['active']:>8}   {rate:>12}"
                  f"   {r['attempts']:>8} {r['attempts_failed']:>7}  {by_attempts:>11}")
        write("attempts   " + "  ".join(f"{k.lower()} {v}" for k, v in s["attempts"].items()))
        write(f"unknown outcomes {s['unknown_outcomes']}   fenced late writes (duplicates prevented) {s['fenced_late_writes']}")
        leases = s["leases"]
        oldest = "-" if leases["oldest_processing_age_seconds"] is None else f"{leases['oldest_processing_age_seconds']:.0f} s"
        write(f"leases     processing {leases['processing']}   stuck {leases['stuck']}   oldest processing {oldest}")
        q = s["queue"]
        if q["error"]:
            write(f"queue      {q['broker']}: unreachable ({q['error']})")
        else:
            in_flight = "" if q["in_flight"] is None else f"   in flight {q['in_flight']}"
            write(f"queue      {q['broker']}: ready {q['ready']}{in_flight}")
        if s["clusters"]:
            for c in s["clusters"]:
                write(f"cluster    {c['cluster_id']} on {c['host']}: {c['status']}, {c['workers']} workers, heartbeat {c['age_seconds']} s ago")
        else:
            write("cluster    no heartbeat seen (no qcluster running, or its stats cache is not shared)")
        write(f"workers    {len(s['workers_seen'])} seen in the last {s['workers_window_minutes']:g} min"
              + "".join(f"\n           {w['worker']} (last start {w['last_started_at']})" for w in s["workers_seen"][:10]))
