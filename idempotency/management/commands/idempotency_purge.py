import sys

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from idempotency.management.purge_arguments import purge_arguments_add, purge_arguments_check
from tqdm import tqdm

from idempotency.purge import records_purge


class Command(BaseCommand):
    help = (
        "The idempotency log's two retentions, in batches. Key retention (RETENTION_HOURS, 24 h): "
        "finished keys are forgotten (their stored result is cleared; the same key then runs again, "
        "its attempt numbers going on). History retention (HISTORY_RETENTION_HOURS, 30 days): the "
        "records are deleted with their attempts (errors, tracebacks). Never touches a PROCESSING "
        "record or a key whose retry is pending; expired leases are reported as stuck for a person."
    )

    def add_arguments(self, parser):
        purge_arguments_add(
            parser, rows="Records", limit_help="Forget at most N keys and delete at most N records.",
            history_help="Delete finished records last changed more than HOURS ago, instead of the history retention.",
        )

    def handle(self, *args, dry_run, older_than, history_older_than, batch_size, limit, json, **options):
        purge_arguments_check(older_than=older_than, history_older_than=history_older_than, batch_size=batch_size, limit=limit)
        # Progress bars on a terminal only: a scheduled run's log gets the one summary line.
        show_progress = not (json or dry_run) and getattr(self.stderr._out, "isatty", lambda: False)()
        stream = self.stderr._out or sys.stderr
        try:
            with tqdm(desc="forgetting keys", unit=" keys", disable=not show_progress, file=stream) as forget_bar, \
                    tqdm(desc="deleting history", unit=" records", disable=not show_progress, file=stream) as delete_bar:
                report = records_purge(
                    older_than_hours=older_than, history_older_than_hours=history_older_than, batch_size=batch_size,
                    dry_run=dry_run, limit=limit, on_forget=forget_bar.update, on_batch=delete_bar.update,
                )
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        if json:
            import json as json_module

            self.stdout.write(json_module.dumps({
                "dry_run": dry_run, "forgotten": report.forgotten, "forget_candidates": report.forget_candidates,
                "deleted": report.deleted, "candidates": report.candidates,
                "stuck": report.stuck, "stuck_examples": report.stuck_examples,
            }))
            return
        if dry_run:
            done = f"would forget {report.forget_candidates} key(s); would delete {report.candidates} record(s) with their attempts"
        else:
            done = f"forgot {report.forgotten} key(s); deleted {report.deleted} record(s) with their attempts"
        self.stdout.write(f"idempotency_purge: {done}; {report.stuck} stuck (PROCESSING, lease expired) kept.")
        for example in report.stuck_examples:
            self.stdout.write(f"  stuck: {example}")
