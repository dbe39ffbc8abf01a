"""Check the live database for duplicates, lost results and stuck work; exit non-zero on any."""
from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from pipeline_ops.integrity import CHECKS, integrity_check


class Command(BaseCommand):
    help = (
        "Read-only integrity checks: duplicate outputs per (input, step), completed records without "
        "their output and outputs without a completed record, outputs written by fenced attempts, "
        "inputs stuck with no live work, records PROCESSING long past their lease. Prints a report "
        "and exits 1 on any violation. Safe in production (reads only, bounded queries)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
        parser.add_argument("--grace", type=float, default=None,
                            help="Seconds before a quiet input or an expired lease counts as stuck (default INTEGRITY_GRACE_SECONDS).")
        parser.add_argument("--limit", type=int, default=100, help="At most this many violations listed per check (default 100).")

    def handle(self, *args, **options):
        if options["limit"] < 1:
            raise CommandError("--limit must be at least 1")
        if options["grace"] is not None and options["grace"] < 0:
            raise CommandError("--grace must not be negative")
        report = integrity_check(grace_seconds=options["grace"], limit=options["limit"])
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2, default=str))
        else:
            for name in CHECKS:
                found = [v for v in report.violations if v.check == name]
                self.stdout.write(f"{name:<26} {'ok' if not found else f'{len(found)} violation(s)'}")
                for violation in found[:10]:
                    self.stdout.write(f"    {violation.message}")
                if len(found) > 10:
                    self.stdout.write(f"    … and {len(found) - 10} more (--json lists them all)")
            for note in report.notes:
                self.stdout.write(f"note: {note}")
            self.stdout.write(report.summary())
        if not report.ok:
            raise CommandError(report.summary())
