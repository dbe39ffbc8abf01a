import getpass
import json as json_module
import re
import socket
import uuid
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from pipeline_ops.management.progress import progress_bar
from pipeline_ops.models import OperatorAction
from pipeline_ops.pipelines import pipeline_get
from pipeline_ops.errors import UnknownPipelineError
from pipeline_ops.selectors.failures import step_runs_list_failed
from pipeline_ops.services.operations import ActionReport, step_runs_retry, step_runs_retry_plan

SOURCE = OperatorAction.Source.CLI
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Step runs listed in --json output (the counts always cover all of them).
JSON_ROWS_MAX = 1000


class CliActor:
    """Who ran the command when no --user is given: the login and host, kept as the audit row's
    actor name (the row's user stays empty)."""

    pk = None

    def __init__(self) -> None:
        try:
            login = getpass.getuser()
        except Exception:  # no login name in a bare container
            login = "unknown"
        self.name = f"{login}@{socket.gethostname()}"

    def get_username(self) -> str:
        return self.name


def parse_since(value: str, *, now: datetime) -> datetime:
    """'90m', '2h', '1d', '30s', '1w' (ago), or an ISO 8601 date/datetime (UTC when naive)."""
    match = _DURATION.match(value.strip().lower())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    parsed = parse_datetime(value.strip())
    if parsed is None:
        day = parse_date(value.strip())
        parsed = datetime(day.year, day.month, day.day) if day else None
    if parsed is None:
        raise ValueError(value)
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed, timezone.utc)


class Command(BaseCommand):
    help = (
        "Retry FAILED step runs safely, with the same service and audit trail as the admin's retry action "
        "(one OperatorAction row per step run, source 'cli'). Completed, cancelled or running steps are "
        "skipped with the reason. Bulk retries are spread at --rate per second by the reconciler."
    )

    def add_arguments(self, parser):
        parser.add_argument("--reason", required=True, help="Why (required; written to the audit trail).")
        parser.add_argument("--pipeline", help="Only inputs of this pipeline.")
        parser.add_argument("--step", help="Only this step (e.g. llm).")
        parser.add_argument("--error-type", metavar="CLASS", help="Only steps whose last attempt failed with this exception class (e.g. ReadTimeout).")
        parser.add_argument("--since", metavar="WHEN", help="Only failures at or after WHEN: 30m, 2h, 1d, or an ISO 8601 date/datetime.")
        parser.add_argument("--limit", type=int, metavar="N", help="Retry at most N step runs (oldest failures first).")
        parser.add_argument(
            "--rate", type=float, metavar="PER_SECOND",
            help="Release at most this many retries per second; the rest wait (RETRY_WAIT) and the reconciler "
                 "sends them when due. 0 = all at once. Default: setting PIPELINE_OPS_RETRY_RATE.",
        )
        parser.add_argument("--user", metavar="USERNAME", help="Record the action as this (existing) user; default: login@host.")
        parser.add_argument("--dry-run", action="store_true", help="Show what would be retried and skipped; change nothing.")
        parser.add_argument("--json", action="store_true", help="Print the result as one JSON object on stdout.")
        parser.add_argument("--progress", action="store_true", default=None, help="Always draw the progress bar (default: only on a terminal).")
        parser.add_argument("--no-progress", action="store_false", dest="progress", help="Never draw the progress bar.")

    def handle(self, *args, reason, pipeline, step, error_type, since, limit, rate, user, dry_run, json, progress, **options):
        now = timezone.now()
        reason = (reason or "").strip()
        if not reason:
            raise CommandError("--reason must not be empty: say why, it goes to the audit trail.")
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1.")
        if rate is not None and rate < 0:
            raise CommandError("--rate must be zero or more per second.")
        if pipeline:
            try:
                pipeline_get(name=pipeline)
            except UnknownPipelineError as error:
                raise CommandError(str(error)) from None
        since_at = None
        if since:
            try:
                since_at = parse_since(since, now=now)
            except ValueError:
                raise CommandError(f"--since {since!r}: use 30m, 2h, 1d or an ISO 8601 date/datetime.") from None
        actor = CliActor()
        if user:
            actor = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: user}).first()
            if actor is None:
                raise CommandError(f"--user {user!r}: no such user.")

        step_runs = list(step_runs_list_failed(pipeline=pipeline, step=step, error_type=error_type, since=since_at, limit=limit))
        error_types = {sr.pk: sr.last_error_type or "" for sr in step_runs}
        if dry_run:
            report = ActionReport(action=OperatorAction.Action.RETRY, verb="would be queued", batch=uuid.uuid4())
            for decision in step_runs_retry_plan(step_runs=step_runs, now=now):
                report.add(decision)
        else:
            report = self._retry(step_runs=step_runs, actor=actor, reason=reason, rate=rate, progress=progress)
        if json:
            self.stdout.write(json_module.dumps(self._as_dict(report, dry_run=dry_run, matched=len(step_runs), error_types=error_types)))
            return
        if not step_runs:
            self.stdout.write("retry_failed: no failed step runs match.")
            return
        prefix = "retry_failed (dry run)" if dry_run else "retry_failed"
        self.stdout.write(f"{prefix}: {len(step_runs)} matched; {report.message}.")
        if not dry_run:
            self.stdout.write(f"Audit batch {report.batch} (admin: Operator actions).")

    def _retry(self, *, step_runs, actor, reason, rate, progress):
        bar = progress_bar(total=len(step_runs), desc="retry", unit="step", enabled=progress, stream=self.stderr._out)
        try:
            return step_runs_retry(
                step_runs=step_runs, actor=actor, reason=reason, source=SOURCE, rate_per_second=rate,
                on_decision=lambda decision: bar.update(1),
            )
        finally:
            bar.close()

    @staticmethod
    def _as_dict(report: ActionReport, *, dry_run: bool, matched: int, error_types: dict) -> dict:
        return {
            "dry_run": dry_run,
            "matched": matched,
            "queued": report.done,
            "skipped": dict(report.skipped),
            "spread_seconds": report.spread_seconds,
            "message": report.message,
            "batch": None if dry_run else str(report.batch),
            "step_runs": [
                {
                    "id": d.target.pk, "input_id": str(d.target.input_id), "step": d.target.step,
                    "error_type": error_types.get(d.target.pk, ""), "acts": d.acts, "kind": d.kind, "reason": d.reason,
                }
                for d in report.decisions[:JSON_ROWS_MAX]
            ],
        }
