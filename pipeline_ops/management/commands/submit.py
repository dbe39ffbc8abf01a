import codecs
import io
import json as json_module
import shutil
import sys
import tempfile

from django.core.management.base import BaseCommand, CommandError

from pipeline_ops.errors import PipelineOpsError
from pipeline_ops.management.progress import progress_bar
from pipeline_ops.services.submissions import DEFAULT_BATCH_SIZE, DEFAULT_SCOPE, inputs_submit_stream

# Shown when a line fails; the full list is in --json output.
ERRORS_PRINTED = 20
# Standard input is spooled to a temporary file past this size (it is read twice: check, then submit).
SPOOL_MEMORY_BYTES = 16 * 1024 * 1024
READ_CHUNK_BYTES = 1024 * 1024


def _utf8_lines_count(raw, *, name: str) -> int:
    """Count the lines of a binary stream, checking that all of it is UTF-8; CommandError (one
    line: where the bad byte is) if not."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, offset, last = 0, 0, b"\n"
    while True:
        chunk = raw.read(READ_CHUNK_BYTES)
        try:
            decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            line = lines + chunk.count(b"\n", 0, max(error.start, 0)) + 1
            raise CommandError(
                f"{name} is not UTF-8 text ({error.reason} at byte {offset + error.start}, line {line}); nothing was submitted."
            ) from None
        if not chunk:
            return lines + (last != b"\n")  # a last line without its newline counts too
        lines += chunk.count(b"\n")
        last = chunk[-1:]
        offset += len(chunk)


class Command(BaseCommand):
    help = (
        "Submit inputs from a JSONL or CSV file (or '-' for stdin), one input a line. Each line's "
        "idempotency key comes from --key-column or, by default, a hash of the pipeline and the payload, "
        "so submitting the same file again creates nothing. Bad lines are reported with their line "
        "number and do not stop the others. Exit status: 0 all good, 1 bad arguments (nothing submitted), "
        "2 some lines were bad (the good ones were submitted)."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", metavar="FILE|-", help="JSONL or CSV file; '-' reads standard input.")
        parser.add_argument("--pipeline", default="default", help="Pipeline every line runs through (default: %(default)s).")
        parser.add_argument(
            "--pipeline-column", metavar="NAME",
            help="Take each line's pipeline from this column/field instead of --pipeline (the field is left out of the payload).",
        )
        parser.add_argument(
            "--key-column", metavar="NAME",
            help="Column/field holding each line's idempotency key (default: SHA-256 of pipeline + canonical payload).",
        )
        parser.add_argument(
            "--format", choices=["jsonl", "csv"], dest="fmt",
            help="Input format (default: csv for *.csv files, jsonl otherwise and for stdin).",
        )
        parser.add_argument("--scope", default=DEFAULT_SCOPE, help="Submission scope the keys belong to (default: %(default)s).")
        parser.add_argument(
            "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
            help="Lines per transaction (default: %(default)s).",
        )
        parser.add_argument("--json", action="store_true", help="Print the summary as one JSON object on stdout.")
        parser.add_argument("--progress", action="store_true", default=None, help="Always draw the progress bar (default: only on a terminal).")
        parser.add_argument("--no-progress", action="store_false", dest="progress", help="Never draw the progress bar.")

    def handle(self, *args, file, pipeline, pipeline_column, key_column, fmt, scope, batch_size, json, progress, **options):
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        if not scope.strip():
            raise CommandError("--scope must not be empty.")
        fmt = fmt or ("csv" if file.lower().endswith(".csv") else "jsonl")
        # The whole input is checked to be UTF-8 (and its lines counted for the progress bar)
        # before anything is submitted: a bad byte on line 90,000 must not leave the first
        # 89,999 lines submitted and the rest not. Standard input is spooled to do the same.
        if file == "-":
            raw = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
            source = getattr(sys.stdin, "buffer", None)
            if source is None:  # a text stdin (tests, embedding): already decoded
                raw.write(sys.stdin.read().encode("utf-8"))
            else:
                shutil.copyfileobj(source, raw)
            raw.seek(0)
        else:
            try:
                raw = open(file, "rb")
            except OSError as error:
                raise CommandError(f"Cannot read {file}: {error.strerror or error}.") from None
        try:
            total = _utf8_lines_count(raw, name="standard input" if file == "-" else file)
            raw.seek(0)
            stream = io.TextIOWrapper(raw, encoding="utf-8", newline="" if fmt == "csv" else None)
        except BaseException:
            raw.close()
            raise
        bar = progress_bar(total=total, desc="submit", unit="line", enabled=progress, stream=self.stderr._out)
        try:
            report = inputs_submit_stream(
                stream=stream, fmt=fmt, pipeline=pipeline, key_column=key_column, pipeline_column=pipeline_column,
                scope=scope, batch_size=batch_size, progress=bar.update,
            )
        except PipelineOpsError as error:
            raise CommandError(str(error)) from None
        finally:
            bar.close()
            stream.close()
        if json:
            self.stdout.write(json_module.dumps(report.as_dict()))
        else:
            for error in report.errors[:ERRORS_PRINTED]:
                self.stderr.write(f"line {error.line}: {error.message}")
            if report.error_count > ERRORS_PRINTED:
                self.stderr.write(f"... and {report.error_count - ERRORS_PRINTED} more bad lines (see --json).")
            self.stdout.write(f"submit: {report.summary} ({report.lines} line{'s' if report.lines != 1 else ''} read).")
        if report.error_count:
            sys.exit(2)
