import sys

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from idempotency.purge import records_purge


class Command(BaseCommand):
    help = (
        "Delete idempotency records past their retention period, in batches. Never deletes a "
        "PROCESSING record; ones whose lease expired are reported as stuck for a person to look at."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Count what would be deleted; delete nothing.")
        parser.add_argument(
            "--older-than", type=float, metavar="HOURS",
            help="Delete finished records last changed more than HOURS ago, instead of using each record's expiry.",
        )
        parser.add_argument("--batch-size", type=int, metavar="N", help="Records deleted per transaction (default: setting PURGE_BATCH_SIZE).")
        parser.add_argument("--limit", type=int, metavar="N", help="Delete at most N records.")
        parser.add_argument("--json", action="store_true", help="Print the summary as one JSON object.")

    def handle(self, *args, dry_run, older_than, batch_size, limit, json, **options):
        if older_than is not None and older_than < 0:
            raise CommandError("--older-than must be zero or more hours.")
        if batch_size is not None and batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1.")
        # A progress bar on a terminal only: a scheduled run's log gets the one summary line.
        show_progress = not (json or dry_run) and getattr(self.stderr._out, "isatty", lambda: False)()
        with tqdm(desc="purging", unit=" records", disable=not show_progress, file=self.stderr._out or sys.stderr) as bar:
            report = records_purge(
                older_than_hours=older_than, batch_size=batch_size, dry_run=dry_run, limit=limit, on_batch=bar.update,
            )
        if json:
            import json as json_module

            self.stdout.write(json_module.dumps({
                "dry_run": dry_run, "deleted": report.deleted, "candidates": report.candidates,
                "stuck": report.stuck, "stuck_examples": report.stuck_examples,
            }))
            return
        verb = "would delete" if dry_run else "deleted"
        count = report.candidates if dry_run else report.deleted
        self.stdout.write(f"idempotency_purge: {verb} {count} record(s); {report.stuck} stuck (PROCESSING, lease expired) kept.")
        for example in report.stuck_examples:
            self.stdout.write(f"  stuck: {example}")
