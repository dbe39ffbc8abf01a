import json as json_module

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from idempotency.management.purge_arguments import purge_arguments_add, purge_arguments_check

from pipeline_ops.management.progress import progress_bar
from pipeline_ops.services.retention import retention_purge


class Command(BaseCommand):
    help = (
        "Every retention stage, in batches (the scheduled purge: run it hourly). History retention "
        "(IDEMPOTENCY_HISTORY_RETENTION_HOURS, 30 days): finished inputs with their step runs and outputs, "
        "operator actions and finished background actions, then the idempotency records and their attempts. "
        "Key retention (IDEMPOTENCY_RETENTION_HOURS, 24 h): finished keys are forgotten (stored results "
        "cleared; the same key runs again). Never deletes live work; stuck leases are reported."
    )

    def add_arguments(self, parser):
        purge_arguments_add(
            parser, rows="Rows", limit_help="At most N rows of each kind (inputs, actions, records, keys).",
            history_help="Delete finished history last changed more than HOURS ago, instead of the history retention.",
        )
        parser.add_argument("--progress", action="store_true", default=None, help="Always draw the progress bar (default: only on a terminal).")
        parser.add_argument("--no-progress", action="store_false", dest="progress", help="Never draw the progress bar.")

    def handle(self, *args, dry_run, older_than, history_older_than, batch_size, limit, json, progress, **options):
        purge_arguments_check(older_than=older_than, history_older_than=history_older_than, batch_size=batch_size, limit=limit)
        bar = progress_bar(total=None, desc="purging", unit=" rows", enabled=False if dry_run or json else progress,
                           stream=self.stderr._out)
        try:
            report = retention_purge(
                older_than_hours=older_than, history_older_than_hours=history_older_than, batch_size=batch_size,
                dry_run=dry_run, limit=limit, on_batch=bar.update,
            )
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        finally:
            bar.close()
        history, log = report.history, report.log
        if json:
            self.stdout.write(json_module.dumps({
                "dry_run": dry_run,
                "inputs": history.inputs, "step_runs": history.step_runs, "outputs": history.outputs,
                "operator_actions": history.operator_actions, "bulk_actions": history.bulk_actions,
                "records": log.candidates if dry_run else log.deleted,
                "keys_forgotten": log.forget_candidates if dry_run else log.forgotten,
                "stuck": log.stuck, "stuck_examples": log.stuck_examples,
            }))
            return
        delete, forget = ("would delete", "would forget") if dry_run else ("deleted", "forgot")
        records = log.candidates if dry_run else log.deleted
        keys = log.forget_candidates if dry_run else log.forgotten
        self.stdout.write(
            f"retention_purge: {delete} {history.inputs} input(s) ({history.step_runs} step runs, {history.outputs} outputs), "
            f"{history.operator_actions} operator action(s), {history.bulk_actions} background action(s), "
            f"{records} idempotency record(s) with their attempts; {forget} {keys} key(s); "
            f"{log.stuck} stuck (PROCESSING, lease expired) kept."
        )
        for example in log.stuck_examples:
            self.stdout.write(f"  stuck: {example}")
