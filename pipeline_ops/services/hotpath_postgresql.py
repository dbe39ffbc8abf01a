"""A guarded step's claim and completion on PostgreSQL, each in one statement.

Every guarded step pays these two, so they are written once as data-modifying CTEs instead of a
transaction of ORM statements (BEGIN, locks, inserts, updates, COMMIT: a round trip each). The
protocol is the one ``services.steps`` follows on every other database, with the guard's own SQL
for the key (``guard.new_key_parts``, ``guard.completion_parts``), so the fencing condition is
written in one place. The same invariant tests run on SQLite (the ORM path) and here.

Lock order inside each statement (``docs/guard.md``): the step runs, then the input, then the key,
then the attempt, then the queue rows. A CTE that only reads another is evaluated before it, and a
scalar ``(SELECT count(*) FROM x)`` in a WHERE clause pulls all of ``x`` (locking its rows) before
the row that clause filters is locked: that is how each statement takes its locks in that order.
A row that ``FOR NO KEY UPDATE`` returns is its newest committed version, re-read under the lock,
so a decision read from the locking CTE (a step's status) cannot be stale.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, connections, router, transaction
from django_q.models import OrmQ

from idempotency import guard
from idempotency.models import Attempt

from .. import pg_broker
from ..models import PipelineInput, StepOutput, StepRun
from ..queueing import step_run_enqueue, step_task_row, uses_transactional_broker
from ..states import InputStatus, StepStatus, step_sources


def _qn(name: str) -> str:
    return connections[router.db_for_write(StepRun)].ops.quote_name(name)


def _table(model) -> str:
    return _qn(model._meta.db_table)


def _in(values) -> str:
    return ", ".join(["%s"] * len(values))


_NOW = "statement_timestamp()"  # the database's clock (idempotency.clock)
_RUNNABLE = step_sources(StepStatus.RUNNING)
_SUCCEEDABLE = step_sources(StepStatus.SUCCEEDED)
_INPUT_ROLLS_UP_FROM = [InputStatus.PENDING, InputStatus.RUNNING, InputStatus.FAILED]


@dataclass(frozen=True)
class NewClaim:
    """What the one-statement claim of a new key did. ``claimed``: the key was new and is ours,
    the step RUNNING; ``runnable`` False: the step had left every state a run starts from (nothing
    written); otherwise the key exists and the caller takes the guard's locked path."""

    runnable: bool
    claimed: guard.Claimed | None = None


def step_claim_new(
    *, step_run: StepRun, scope: str, operation: str, fingerprint: str, lease_seconds: float, worker: str | None = None
) -> NewClaim:
    """Claim a new key for ``step_run`` and move the step to RUNNING (and its input to RUNNING if
    it is not) in one autocommitted statement. A key that exists already writes nothing."""
    parts = guard.new_key_parts(
        scope=scope, key=step_run.idempotency_key, operation=operation, fingerprint=fingerprint,
        lease_seconds=lease_seconds, worker=worker,
        # The record is inserted only once the step (and the input, when it moves) is locked.
        source="step WHERE (SELECT count(*) FROM input_lock) >= 0", record="rec",
    )
    steps, inputs = _table(StepRun), _table(PipelineInput)
    sql = (
        f"WITH step AS (SELECT id FROM {steps} WHERE id = %s AND status IN ({_in(_RUNNABLE)}) FOR NO KEY UPDATE), "
        f"input_lock AS (SELECT id FROM {inputs} WHERE id = %s AND status <> %s AND status IN ({_in(_INPUT_ROLLS_UP_FROM)}) "
        f"AND EXISTS (SELECT 1 FROM step) FOR NO KEY UPDATE), "
        f"rec AS ({parts.record_sql}), "
        f"att AS ({parts.attempt_sql}), "
        f"moved AS (UPDATE {steps} SET status = %s, attempts_used = {steps}.attempts_used + 1, "
        f"started_at = COALESCE({steps}.started_at, {_NOW}), next_attempt_at = NULL, "
        f"idempotency_record_id = rec.id, updated_at = {_NOW} FROM rec WHERE {steps}.id = %s RETURNING 1), "
        f"input_moved AS (UPDATE {inputs} SET status = %s, finished_at = NULL, updated_at = {_NOW} "
        f"FROM input_lock, rec WHERE {inputs}.id = input_lock.id RETURNING 1) "
        f"SELECT (SELECT count(*) FROM step), att.record_id, att.started_at FROM (SELECT 1) AS one LEFT JOIN att ON true"
    )
    input_id = PipelineInput._meta.pk.get_db_prep_value(step_run.input_id, connections[router.db_for_write(StepRun)])
    params = [
        step_run.pk, *_RUNNABLE,
        input_id, InputStatus.RUNNING, *_INPUT_ROLLS_UP_FROM,
        *parts.record_params, *parts.attempt_params,
        StepStatus.RUNNING, step_run.pk,
        InputStatus.RUNNING,
    ]
    connection = connections[router.db_for_write(StepRun)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        runnable, record_id, started_at = cursor.fetchone()
    if not runnable:
        return NewClaim(runnable=False)
    if record_id is None:
        return NewClaim(runnable=True)
    return NewClaim(runnable=True, claimed=parts.claimed(record_id, started_at))


class StepLeftRunningError(Exception):
    """The attempt held the key but its step had left every state a completion moves from."""


def step_complete(
    *, step_run: StepRun, attempt: Attempt, output: dict, details: dict | None, next_step_id: int | None,
    input_running: bool, ack_id: int | None,
) -> guard.Completion:
    """Complete ``attempt`` with ``output``: the key COMPLETED and the attempt SUCCEEDED (the
    guard's fenced UPDATEs), the output stored, the step SUCCEEDED, the next step QUEUED with its
    queue row (on the ORM table), and the delivered task's own queue row deleted (the ack), all
    in one statement. A middle step of a running input needs nothing else and is autocommitted;
    the last step (or an input not RUNNING) rolls the input up in the same transaction: in the
    statement itself when every other step succeeded, else with ``input_roll_up``.

    Every time it writes is the database's (``statement_timestamp()``), as the claim's: a worker
    whose host clock is off moves no expiry and no "last changed" that the purge judges.

    Fenced or refused: nothing is written and the guard says why (``guard.completion_refused``).
    Raises StepLeftRunningError (nothing written) when the attempt held the key but the step had
    left RUNNING, and IntegrityError for a domain write the database refused while it held it.
    """
    from .inputs import input_roll_up

    connection = connections[router.db_for_write(StepRun)]
    parts = guard.completion_parts(attempt=attempt, result=output, details=details, now=None, connection=connection)
    roll_up = next_step_id is None or not input_running
    on_orm_table = uses_transactional_broker()
    queue_key, payload = step_task_row(step_run_id=next_step_id) if next_step_id is not None and on_orm_table else (None, None)
    notify_channel = pg_broker.notify_channel(queue_key) if queue_key is not None and settings.PIPELINE_OPS_BROKER == "postgres" else None
    steps, inputs, outputs, queue = _table(StepRun), _table(PipelineInput), _table(StepOutput), _table(OrmQ)
    output_field = StepOutput._meta.get_field("output")
    input_id = PipelineInput._meta.pk.get_db_prep_value(step_run.input_id, connection)
    sql = (
        f"WITH lk AS (SELECT id, status FROM {steps} WHERE id IN (%s, %s) ORDER BY id FOR NO KEY UPDATE), "
        f"input_lock AS (SELECT id FROM {inputs} WHERE id = %s AND %s AND (SELECT count(*) FROM lk) >= 0 FOR NO KEY UPDATE), "
        # The key moves only while this attempt holds it *and* its step may succeed (read under the lock).
        f"held AS ({parts.held_sql} AND (SELECT count(*) FROM input_lock) >= 0 "
        f"AND EXISTS (SELECT 1 FROM lk WHERE id = %s AND status IN ({_in(_SUCCEEDABLE)})) RETURNING 1), "
        f"ended AS ({parts.ended_sql} AND EXISTS (SELECT 1 FROM held) RETURNING 1), "
        f"done AS (UPDATE {steps} SET status = %s, finished_at = {_NOW}, last_error = '', next_attempt_at = NULL, updated_at = {_NOW} "
        f"WHERE id = %s AND EXISTS (SELECT 1 FROM held) RETURNING id), "
        f"stored AS (INSERT INTO {outputs} (step_run_id, input_id, step, attempt_id, output, created_at) "
        f"SELECT id, %s, %s, %s, %s, {_NOW} FROM done RETURNING 1), "
        f"queued AS (UPDATE {steps} SET status = %s, enqueued_at = {_NOW}, updated_at = {_NOW} "
        f"WHERE id = %s AND status = %s AND EXISTS (SELECT 1 FROM done) RETURNING id), "
        f"sent AS (INSERT INTO {queue} (key, payload, lock) SELECT %s, %s, {_NOW} FROM queued WHERE %s RETURNING 1), "
        f"acked AS (DELETE FROM {queue} WHERE id = %s AND EXISTS (SELECT 1 FROM done) RETURNING 1), "
        # The last step of a chain whose other steps all succeeded (they cannot move any more:
        # nothing leaves SUCCEEDED) makes the input SUCCEEDED; any other shape is rolled up by
        # ``input_roll_up`` in the same transaction.
        f"rolled AS (UPDATE {inputs} SET status = %s, finished_at = {_NOW}, updated_at = {_NOW} "
        f"WHERE id = %s AND %s AND status IN ({_in(_INPUT_ROLLS_UP_FROM)}) AND EXISTS (SELECT 1 FROM done) "
        f"AND NOT EXISTS (SELECT 1 FROM {steps} WHERE input_id = %s AND id <> %s AND status <> %s) RETURNING 1) "
        f"SELECT (SELECT count(*) FROM held), (SELECT count(*) FROM queued), (SELECT count(*) FROM rolled)"
        # The PostgreSQL broker's wake-up, sent at commit (a CTE nobody reads would never run).
        + (", (SELECT count(pg_notify(%s, '')) FROM sent)" if notify_channel else "")
    )
    params = [
        step_run.pk, next_step_id,
        input_id, roll_up,
        *parts.held_params, step_run.pk, *_SUCCEEDABLE,
        *parts.ended_params,
        StepStatus.SUCCEEDED, step_run.pk,
        input_id, step_run.step, Attempt._meta.pk.get_db_prep_value(attempt.pk, connection),
        output_field.get_db_prep_save(output, connection),
        StepStatus.QUEUED, next_step_id, StepStatus.PENDING,
        queue_key, payload, queue_key is not None,
        ack_id,
        InputStatus.SUCCEEDED, input_id, next_step_id is None, *_INPUT_ROLLS_UP_FROM,
        input_id, step_run.pk, StepStatus.SUCCEEDED,
        *([notify_channel] if notify_channel else []),
    ]

    def run() -> tuple[int, int, int]:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()[:3]

    try:
        # ``done`` follows ``held`` alone (the step is locked and may succeed): "held" says all.
        if roll_up:
            with transaction.atomic(using=connection.alias):
                held, queued, rolled = run()
                if held and not rolled:
                    input_roll_up(input_id=step_run.input_id)
        else:
            held, queued, _ = run()
    except IntegrityError as exc:
        if guard.held_by(attempt):
            raise
        return guard.completion_refused(attempt=attempt, details=details, refused_by=exc)
    if held:
        if queued and not on_orm_table:
            # Redis: the next step's message is sent now that the completion has committed.
            step_run_enqueue(step_run_id=next_step_id)
        return guard.Completion(fenced=False, result=output)
    if guard.held_by(attempt):
        # Nothing was written: the key is still ours, but the step moved on without us (an
        # operator's move that did not take the key away).
        raise StepLeftRunningError(f"step run {step_run.pk} left RUNNING while attempt #{attempt.number} held its key")
    return guard.completion_refused(attempt=attempt, details=details)


# --- the read ----------------------------------------------------------------------------------

_READ: dict[str, tuple] = {}


def _read_statement(connection) -> tuple:
    """The read's SQL and each column's model field and converters, built once per connection
    vendor (the text never changes; the ORM would compile it on every step)."""
    if connection.alias in _READ:
        return _READ[connection.alias]
    steps, inputs, outputs = _table(StepRun), _table(PipelineInput), _table(StepOutput)
    step_fields = [f for f in StepRun._meta.concrete_fields]
    input_fields = [f for f in PipelineInput._meta.concrete_fields]
    columns = [f"s.{_qn(f.column)}" for f in step_fields] + [f"i.{_qn(f.column)}" for f in input_fields]
    sql = (
        f"SELECT {', '.join(columns)}, "
        f"(SELECT json_object_agg(o.step, o.output) FROM {outputs} o JOIN {steps} p ON p.id = o.step_run_id "
        f"WHERE o.input_id = s.input_id AND p.position < s.position), "
        f"(SELECT n.id FROM {steps} n WHERE n.input_id = s.input_id AND n.position = s.position + 1) "
        f"FROM {steps} s JOIN {inputs} i ON i.id = s.input_id WHERE s.id = %s"
    )

    def converters(model, fields, alias):
        return [
            f.get_db_converters(connection) + connection.ops.get_db_converters(f.get_col(alias)) for f in fields
        ]

    _READ[connection.alias] = (
        sql, [f.attname for f in step_fields], [f.attname for f in input_fields],
        converters(StepRun, step_fields, "s"), converters(PipelineInput, input_fields, "i"),
        step_fields, input_fields,
    )
    return _READ[connection.alias]


def step_read(*, step_run_id: int) -> StepRun | None:
    """The step run with its input, ``earlier_outputs`` ({step: output} of the steps before it)
    and ``next_step_id``, in one statement of fixed text."""
    import json

    connection = connections[router.db_for_write(StepRun)]
    sql, step_names, input_names, step_conv, input_conv, step_fields, input_fields = _read_statement(connection)
    with connection.cursor() as cursor:
        cursor.execute(sql, [step_run_id])
        row = cursor.fetchone()
    if row is None:
        return None

    def convert(values, fields, conv):
        out = []
        for value, field, funcs in zip(values, fields, conv):
            for func in funcs:
                value = func(value, field.get_col(field.model._meta.db_table), connection)
            out.append(value)
        return out

    n_step = len(step_names)
    step_run = StepRun.from_db(connection.alias, step_names, convert(row[:n_step], step_fields, step_conv))
    pipeline_input = PipelineInput.from_db(
        connection.alias, input_names, convert(row[n_step:n_step + len(input_names)], input_fields, input_conv)
    )
    StepRun.input.field.set_cached_value(step_run, pipeline_input)
    raw_outputs, step_run.next_step_id = row[-2], row[-1]
    step_run.earlier_outputs = (json.loads(raw_outputs) if isinstance(raw_outputs, str) else raw_outputs) or {}
    return step_run
