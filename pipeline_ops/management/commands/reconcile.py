"""Re-enqueue due retries, expired leases and lost messages: once, or in a loop."""
from __future__ import annotations

import json
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pipeline_ops.reconciler import reconcile_once, reconcile_schedule_install


class Command(BaseCommand):
    help = (
        "The reconciler: re-enqueues step runs whose retry is due, whose lease expired, and queued ones "
        "with no task on the broker (lost messages). Loops every --interval seconds until SIGTERM; "
        "--once runs one pass. A django-q2 schedule ('pipeline_ops.reconcile', created by the migrations "
        "or --install-schedule) also runs one pass every minute inside the cluster."
    )

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="One pass, then exit.")
        parser.add_argument("--interval", type=float, default=None,
                            help="Seconds between passes (default RECONCILER_INTERVAL_SECONDS).")
        parser.add_argument("--dry-run", action="store_true", help="Report what would be re-enqueued; change nothing.")
        parser.add_argument("--json", action="store_true", help="One JSON object per pass.")
        parser.add_argument("--limit", type=int, default=None, help="At most this many step runs per kind per pass.")
        parser.add_argument("--grace", type=float, default=None,
                            help="Seconds a queued step may go without a visible task (default RECONCILER_LOST_GRACE_SECONDS).")
        parser.add_argument("--install-schedule", action="store_true",
                            help="Create or repair the every-minute django-q2 schedule, then exit.")

    def handle(self, *args, **options):
        interval = settings.RECONCILER_INTERVAL_SECONDS if options["interval"] is None else options["interval"]
        if interval <= 0:
            raise CommandError("--interval must be positive")
        if options["limit"] is not None and options["limit"] < 1:
            raise CommandError("--limit must be at least 1")
        if options["grace"] is not None and options["grace"] < 0:
            raise CommandError("--grace must not be negative")
        if options["install_schedule"]:
            created = reconcile_schedule_install()
            self.stdout.write(f"schedule 'pipeline_ops.reconcile' {'created' if created else 'already present (checked)'}")
            return
        stopping = threading.Event()
        if not options["once"]:
            signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
        try:
            while True:
                report = reconcile_once(dry_run=options["dry_run"], limit=options["limit"], lost_grace_seconds=options["grace"])
                if options["json"]:
                    self.stdout.write(json.dumps(report.as_dict()))
                else:
                    self.stdout.write(f"{report.now:%H:%M:%S} {report.summary()}")
                    for note in report.notes:
                        self.stdout.write(f"  note: {note}")
                self.stdout.flush()
                if options["once"] or stopping.wait(interval):
                    return
        except KeyboardInterrupt:
            return
