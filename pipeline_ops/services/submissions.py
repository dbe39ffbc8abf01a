"""Bulk submission of inputs from files (JSONL or CSV), for the ``submit`` command and scripts.

One transaction per batch writes the inputs, their step runs and the first steps' tasks. The
unique constraint ``(submission_scope, idempotency_key)`` decides which lines are new: every row
gets its id before the insert, the insert skips conflicting keys (``ON CONFLICT DO NOTHING`` /
``INSERT OR IGNORE``), and reading the keys back tells which ids won. A key already taken, by an
earlier run or by a concurrent submitter of the same file, comes back with another id: nothing is
created for it and nothing is enqueued. There is no check-then-insert anywhere.
"""
from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

from idempotency.fingerprint import fingerprint

from ..errors import PipelineOpsError
from ..models import PipelineInput, StepRun
from ..pipelines import pipeline_get
# queueing's per-process broker: the one the chaos harness re-points when it swaps brokers.
from ..queueing import process_broker, step_run_enqueue, step_task_payload, uses_transactional_broker
from ..states import StepStatus
from .validation import PayloadValidationError, input_payload_validate

Format = Literal["jsonl", "csv"]
EnqueueMode = Literal["bulk", "each"]

DEFAULT_BATCH_SIZE = 500
DEFAULT_SCOPE = "cli"
KEY_MAX_LENGTH = PipelineInput._meta.get_field("idempotency_key").max_length
# Errors kept in the report; the count goes on past this, so a file of garbage cannot eat memory.
MAX_ERRORS_KEPT = 1000


class SubmissionFormatError(PipelineOpsError):
    code = "submission_format"
    default_message = "The submission file format is not supported."


@dataclass(frozen=True)
class SubmissionLine:
    """One parsed input: its line number in the file, pipeline, payload and idempotency key."""

    line: int
    pipeline: str
    payload: dict
    key: str


@dataclass(frozen=True)
class LineError:
    """A line that could not be submitted, and why; the rest of the file goes on."""

    line: int
    message: str


@dataclass
class BulkSubmitReport:
    lines: int = 0
    created: int = 0
    already_submitted: int = 0
    error_count: int = 0
    errors: list[LineError] = field(default_factory=list)
    batches: int = 0

    def error_add(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(error)

    @property
    def summary(self) -> str:
        text = f"{self.created} created, {self.already_submitted} already submitted"
        if self.error_count:
            text += f", {self.error_count} bad line{'s' if self.error_count != 1 else ''}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "created": self.created,
            "already_submitted": self.already_submitted,
            "errors": self.error_count,
            "error_lines": [{"line": e.line, "message": e.message} for e in self.errors],
            "batches": self.batches,
        }


def submission_key_default(*, pipeline: str, payload: dict) -> str:
    """The content hash used as idempotency key when the file names no key column: the same
    pipeline and the same payload (key order and whitespace aside) are the same submission."""
    return fingerprint({"pipeline": pipeline, "payload": payload})


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would make payloads that cannot be hashed or stored.
    raise ValueError(f"{name} is not valid JSON")


def _line_build(
    *, line: int, row: dict, pipeline: str, key_column: str | None, pipeline_column: str | None
) -> SubmissionLine | LineError:
    name = pipeline
    if pipeline_column is not None:
        name = row.get(pipeline_column)
        if not isinstance(name, str) or not name:
            return LineError(line, f"no pipeline in column {pipeline_column!r}")
        row = {k: v for k, v in row.items() if k != pipeline_column}
    if name not in settings.PIPELINES:
        return LineError(line, f"unknown pipeline {name!r}")
    try:
        # The API's validator on what will be stored: a line the API would refuse is refused here, with its code.
        input_payload_validate(payload=row)
    except PayloadValidationError as error:
        return LineError(line, f"{error.message} ({error.code})")
    if key_column is not None:
        value = row.get(key_column)
        if value is None or isinstance(value, (dict, list, bool)) or str(value).strip() == "":
            return LineError(line, f"no idempotency key in column {key_column!r}")
        key = str(value).strip()
        if len(key) > KEY_MAX_LENGTH:
            return LineError(line, f"idempotency key longer than {KEY_MAX_LENGTH} characters")
    else:
        key = submission_key_default(pipeline=name, payload=row)
    return SubmissionLine(line=line, pipeline=name, payload=row, key=key)


def submission_lines_read(
    *,
    stream: Iterable[str],
    fmt: Format,
    pipeline: str = "default",
    key_column: str | None = None,
    pipeline_column: str | None = None,
) -> Iterator[SubmissionLine | LineError]:
    """Parse a JSONL or CSV text stream into submission lines, one per input, lazily.

    A line that cannot be an input (bad JSON, not an object, unknown pipeline, missing key) comes
    out as a ``LineError`` with its 1-based line number, and reading goes on. Blank lines are skipped.
    Raises UnknownPipelineError (``pipeline`` itself is not declared) and SubmissionFormatError.
    """
    if pipeline_column is None:
        pipeline_get(name=pipeline)
    if fmt == "jsonl":
        yield from _jsonl_read(stream, pipeline=pipeline, key_column=key_column, pipeline_column=pipeline_column)
    elif fmt == "csv":
        yield from _csv_read(stream, pipeline=pipeline, key_column=key_column, pipeline_column=pipeline_column)
    else:
        raise SubmissionFormatError(f"Unknown format {fmt!r}: use 'jsonl' or 'csv'.")


def _jsonl_read(stream, *, pipeline, key_column, pipeline_column):
    for number, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as error:
            yield LineError(number, f"bad JSON: {error.msg} at column {error.colno}")
            continue
        except ValueError as error:  # NaN / Infinity
            yield LineError(number, f"bad JSON: {error}")
            continue
        if not isinstance(row, dict):
            yield LineError(number, f"not a JSON object (got {type(row).__name__})")
            continue
        yield _line_build(line=number, row=row, pipeline=pipeline, key_column=key_column, pipeline_column=pipeline_column)


def _csv_read(stream, *, pipeline, key_column, pipeline_column):
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as error:
        raise SubmissionFormatError(f"line 1: unreadable CSV header: {error}") from None
    header = [name.strip() for name in header]
    if not any(header) or len(set(header)) != len(header):
        raise SubmissionFormatError("line 1: the CSV header needs distinct, non-empty column names.")
    for column, option in ((key_column, "--key-column"), (pipeline_column, "--pipeline-column")):
        if column is not None and column not in header:
            raise SubmissionFormatError(f"{option} {column!r} is not a column of the CSV header ({', '.join(header)}).")
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield LineError(reader.line_num, f"bad CSV: {error}")
            continue
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield LineError(reader.line_num, f"expected {len(header)} columns, got {len(values)}")
            continue
        row = dict(zip(header, values))
        yield _line_build(line=reader.line_num, row=row, pipeline=pipeline, key_column=key_column, pipeline_column=pipeline_column)


def _tasks_bulk_enqueue(step_run_ids: list[int]) -> None:
    """Put one task per step run on the queue with one statement (ORM broker) or one RPUSH (Redis).

    The packages are ``queueing.step_task_payload``'s: a worker cannot tell them apart from
    ``queueing.step_run_enqueue``'s.
    """
    from django_q.conf import Conf
    from django_q.models import OrmQ

    if not step_run_ids:
        return
    broker = process_broker()
    packages = [step_task_payload(step_run_id=step_run_id) for step_run_id in step_run_ids]
    if uses_transactional_broker():
        # Same alias as our models: these rows commit or roll back with the batch (the outbox).
        if hasattr(broker, "enqueue_many"):
            # The PostgreSQL broker: one INSERT on the database's clock, one NOTIFY at commit.
            broker.enqueue_many(packages)
        else:
            now = timezone.now()
            OrmQ.objects.using(Conf.ORM).bulk_create(
                [OrmQ(key=broker.list_key or Conf.CLUSTER_NAME, payload=p, lock=now) for p in packages]
            )
    else:
        # Redis is not transactional: send after commit; the reconciler re-sends a lost message.
        transaction.on_commit(lambda: broker.connection.rpush(broker.list_key, *packages))


def _step_runs_insert(*, input_ids: list[uuid.UUID], pipelines: set[str], now) -> None:
    """Create the step runs of new inputs with one INSERT ... SELECT: the inputs joined with
    their pipelines' step lists, first step QUEUED, the others PENDING (what ``input_submit``
    creates row by row).

    Set-based because it is the bulk of the work: three step rows per input through
    ``bulk_create`` cost more Python time (per-field value preparation) than everything else of
    a batch together. Every other column gets its model default (or ``now`` for auto_now
    fields), read from the model, so a new field with a default needs no change here.
    """
    step_table = StepRun._meta.db_table
    input_table = PipelineInput._meta.db_table
    quote = connection.ops.quote_name
    steps_sql, steps_params = [], []
    for name in sorted(pipelines):
        for position, step in enumerate(pipeline_get(name=name).steps):
            steps_sql.append("SELECT %s AS pipeline, %s AS step, %s AS position")
            steps_params += [name, step, position]
    columns, values, params = [], [], []
    for model_field in StepRun._meta.concrete_fields:
        if model_field.primary_key:
            continue
        column = model_field.column
        columns.append(quote(column))
        if model_field.name == "input":
            values.append(f"pi.{quote(PipelineInput._meta.pk.column)}")
        elif model_field.name in ("step", "position"):
            values.append(f"s.{model_field.name}")
        elif model_field.name == "status":
            values.append("CASE WHEN s.position = 0 THEN %s ELSE %s END")
            params += [StepStatus.QUEUED.value, StepStatus.PENDING.value]
        elif model_field.name == "enqueued_at":
            values.append("CASE WHEN s.position = 0 THEN %s ELSE NULL END")
            params.append(model_field.get_db_prep_save(now, connection))
        else:
            auto = getattr(model_field, "auto_now", False) or getattr(model_field, "auto_now_add", False)
            values.append("%s")
            params.append(model_field.get_db_prep_save(now if auto else model_field.get_default(), connection))
    pk = PipelineInput._meta.pk
    id_params = [pk.get_db_prep_value(pk_value, connection) for pk_value in input_ids]
    sql = (
        f"INSERT INTO {quote(step_table)} ({', '.join(columns)}) "
        f"SELECT {', '.join(values)} FROM {quote(input_table)} pi "
        f"JOIN ({' UNION ALL '.join(steps_sql)}) s ON s.pipeline = pi.{quote(PipelineInput._meta.get_field('pipeline').column)} "
        f"WHERE pi.{quote(pk.column)} IN ({', '.join(['%s'] * len(id_params))})"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *steps_params, *id_params])


def _batch_submit(
    *, batch: list[SubmissionLine], scope: str, submitted_by: AbstractBaseUser | None, enqueue: EnqueueMode
) -> tuple[int, int]:
    """Returns (created, already submitted) for one batch, written in one transaction."""
    from django_q.conf import Conf

    # A key seen twice in one batch: the first line is the submission, the others repeat it.
    first_by_key: dict[str, SubmissionLine] = {}
    for item in batch:
        first_by_key.setdefault(item.key, item)
    repeats = len(batch) - len(first_by_key)
    now = timezone.now()
    rows = [
        PipelineInput(
            id=uuid.uuid4(), pipeline=item.pipeline, payload=item.payload, submission_scope=scope,
            idempotency_key=key, submitted_by=submitted_by,
        )
        for key, item in first_by_key.items()
    ]
    with transaction.atomic():
        PipelineInput.objects.bulk_create(rows, ignore_conflicts=True)
        # Whose id holds each key now tells which rows this batch created (see the module docstring).
        holders = dict(
            PipelineInput.objects.filter(submission_scope=scope, idempotency_key__in=list(first_by_key))
            .values_list("idempotency_key", "id")
        )
        new = [row for row in rows if holders.get(row.idempotency_key) == row.id]
        new_ids = [row.id for row in new]
        if new_ids:
            _step_runs_insert(input_ids=new_ids, pipelines={row.pipeline for row in new}, now=now)
        first_ids = list(StepRun.objects.filter(input_id__in=new_ids, position=0).values_list("pk", flat=True)) if new_ids else []
        if enqueue == "bulk" and not Conf.SYNC:
            _tasks_bulk_enqueue(first_ids)
        else:
            for step_run_id in first_ids:
                step_run_enqueue(step_run_id=step_run_id)
    return len(new), len(rows) - len(new) + repeats


def inputs_submit_bulk(
    *,
    lines: Iterable[SubmissionLine | LineError],
    scope: str = DEFAULT_SCOPE,
    submitted_by: AbstractBaseUser | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    enqueue: EnqueueMode = "bulk",
    progress: Callable[[int], None] | None = None,
) -> BulkSubmitReport:
    """Submit parsed lines in batches of ``batch_size``, one transaction per batch.

    Each batch creates the new inputs, their step runs and the first steps' tasks, or nothing at
    all; lines whose key is already taken in ``scope`` create nothing and are counted as already
    submitted. ``LineError`` items are counted and kept in the report; they stop nothing.
    ``progress(n)`` is called after each batch with the number of lines it consumed.
    Raises ValueError (batch_size < 1) and database errors of a batch (earlier batches stay committed).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = BulkSubmitReport()
    batch: list[SubmissionLine] = []
    consumed = 0

    def flush() -> None:
        nonlocal batch, consumed
        if batch:
            created, existing = _batch_submit(batch=batch, scope=scope, submitted_by=submitted_by, enqueue=enqueue)
            report.created += created
            report.already_submitted += existing
            report.batches += 1
        if progress is not None and consumed:
            progress(consumed)
        batch, consumed = [], 0

    for item in lines:
        report.lines += 1
        consumed += 1
        if isinstance(item, LineError):
            report.error_add(item)
        else:
            batch.append(item)
        if len(batch) >= batch_size:
            flush()
    flush()
    return report


def inputs_submit_stream(
    *,
    stream: Iterable[str],
    fmt: Format,
    pipeline: str = "default",
    key_column: str | None = None,
    pipeline_column: str | None = None,
    scope: str = DEFAULT_SCOPE,
    submitted_by: AbstractBaseUser | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    enqueue: EnqueueMode = "bulk",
    progress: Callable[[int], None] | None = None,
) -> BulkSubmitReport:
    """Read a JSONL or CSV stream and submit every good line (see ``inputs_submit_bulk``).

    Raises UnknownPipelineError, SubmissionFormatError, ValueError.
    """
    lines = submission_lines_read(
        stream=stream, fmt=fmt, pipeline=pipeline, key_column=key_column, pipeline_column=pipeline_column
    )
    return inputs_submit_bulk(
        lines=lines, scope=scope, submitted_by=submitted_by, batch_size=batch_size, enqueue=enqueue, progress=progress
    )

