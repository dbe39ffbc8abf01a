"""Faults of the database itself while steps run, injected into real PostgreSQL sessions.

None of them may lose work, duplicate work or make a step terminal:

* a worker's backend terminated in the middle of its completion (a restart, a failover, a pooler
  reconnect) and a ``lock_timeout`` there: the step ends SUCCEEDED by its first and only attempt;
* an operator's cancel lined up against a claiming worker: both finish, nobody loses a deadlock;
* a worker whose host clock runs minutes ahead: it never takes a live lease over, and its
  reconciler never calls a live lease expired.

The interleavings are lined up, not hoped for: a trigger on the table a move writes parks that
transaction on an advisory lock the test holds (``barrier``), and the test acts once
``pg_locks``/``pg_stat_activity`` show the session waiting there. What is counted (calls of the
step's function, attempts, outputs) is counted apart from the guard that enforces it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.db import connection, connections, transaction

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.integrity import integrity_check
from pipeline_ops.models import PipelineInput, StepOutput, StepRun
from pipeline_ops.services import steps as step_services
from pipeline_ops.services.inputs import input_submit
from pipeline_ops.services.operations import inputs_cancel, step_runs_retry
from pipeline_ops.services.steps import Outcome
from pipeline_ops.states import InputStatus, StepStatus
from pipeline_ops.steps import TransientStepError

from .conftest import StepThread, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
BARRIER_LOCK = 4711
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


class Barrier:
    """Parks transactions that write ``table`` (``event``, rows matching ``when``) on an advisory
    lock the test holds.

    ``mode``: ``"off"`` (pass), ``"wait"`` (wait for the lock), ``"timeout"`` (the same wait with a
    100 ms ``lock_timeout``: the transaction fails with lock_not_available). A sequence counts the
    transactions that reached it (sequences are not rolled back with them).
    """

    def __init__(self, table: str, event: str = "INSERT", when: str = ""):
        self.table = table
        self.session = connections.create_connection("default")  # holds the lock, apart from the test's
        self.session.ensure_connection()
        self._sql(f"""
            CREATE TABLE fault_barrier (id int PRIMARY KEY, mode text NOT NULL);
            INSERT INTO fault_barrier VALUES (1, 'off');
            CREATE SEQUENCE fault_barrier_hits;
            CREATE FUNCTION fault_barrier_trip() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE wanted text;
            BEGIN
                SELECT mode INTO wanted FROM fault_barrier WHERE id = 1;
                IF wanted = 'off' THEN RETURN NULL; END IF;
                PERFORM nextval('fault_barrier_hits');
                IF wanted = 'timeout' THEN PERFORM set_config('lock_timeout', '100ms', true); END IF;
                PERFORM pg_advisory_xact_lock({BARRIER_LOCK});
                RETURN NULL;
            END $$;
            CREATE TRIGGER fault_barrier_trip AFTER {event} ON {table} FOR EACH ROW {f"WHEN ({when})" if when else ""}
                EXECUTE FUNCTION fault_barrier_trip();
        """)

    def _sql(self, sql: str, params=None):
        with self.session.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else None

    def close_with(self, mode: str) -> None:
        """Hold the lock and arm the trigger: the next transactions that write the table park."""
        self._sql("SELECT pg_advisory_lock(%s)", [BARRIER_LOCK])
        self._sql("UPDATE fault_barrier SET mode = %s", [mode])

    def open(self) -> None:
        self._sql("UPDATE fault_barrier SET mode = 'off'")
        self._sql("SELECT pg_advisory_unlock_all()")

    def hits(self) -> int:
        return self._sql("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM fault_barrier_hits")[0][0]

    def parked_pid(self) -> int | None:
        rows = self._sql("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND NOT granted", [BARRIER_LOCK])
        return rows[0][0] if rows else None

    def terminate(self, pid: int) -> None:
        assert self._sql("SELECT pg_terminate_backend(%s)", [pid]) == [(True,)]

    def drop(self) -> None:
        try:
            self.open()
            self._sql(f"""
                DROP TRIGGER IF EXISTS fault_barrier_trip ON {self.table};
                DROP FUNCTION IF EXISTS fault_barrier_trip();
                DROP SEQUENCE IF EXISTS fault_barrier_hits;
                DROP TABLE IF EXISTS fault_barrier;
            """)
        finally:
            self.session.close()


@pytest.fixture
def barrier():
    made: list[Barrier] = []

    def on(table: str, event: str = "INSERT", when: str = "") -> Barrier:
        made.append(Barrier(table, event, when))
        return made[-1]

    yield on
    for each in made:
        each.drop()


@pytest.fixture
def counted_step(test_steps, pipeline):
    """A one-step pipeline whose step counts its calls in the test's memory, not in the database."""
    calls: list[int] = []
    gate = threading.Event()
    gate.set()

    def counted(ctx):
        calls.append(ctx.attempt_number)
        assert gate.wait(60), "the test never opened the step's gate"
        return {"attempt": ctx.attempt_number}

    def make(*, lease_seconds: float = 30.0, gated: bool = False):
        if gated:
            gate.clear()
        test_steps("counted", counted, lease_seconds=lease_seconds)
        name = pipeline("fault_pipe", ["counted"])
        pipeline_input = input_submit(pipeline=name, payload={"text": "a document"}, scope="tests").input
        return pipeline_input, StepRun.objects.get(input=pipeline_input), calls, gate

    return make


@pytest.fixture
def fails_first_step(test_steps, pipeline):
    """A one-step pipeline whose attempt #1 fails transiently and #2 succeeds; calls counted in
    the test's memory."""
    calls: list[int] = []

    def fails_first(ctx):
        calls.append(ctx.attempt_number)
        if ctx.attempt_number == 1:
            raise TransientStepError("503 from the model")
        return {"attempt": ctx.attempt_number}

    test_steps("fails_first", fails_first, max_attempts=3)
    pipeline_input = input_submit(pipeline=pipeline("fails_first_pipe", ["fails_first"]), payload={"text": "x"}, scope="tests").input
    return pipeline_input, StepRun.objects.get(input=pipeline_input), calls


def attempts_of(step_run: StepRun) -> list[Attempt]:
    return list(Attempt.objects.filter(record__scope="step", record__key=step_run.idempotency_key).order_by("number"))


def assert_succeeded_once(pipeline_input: PipelineInput, step_run: StepRun, calls: list[int]) -> None:
    assert calls == [1], f"the step's function ran {len(calls)} times: {calls}"
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.SUCCEEDED and step_run.attempts_used == 1
    assert [a.status for a in attempts_of(step_run)] == [AttemptStatus.SUCCEEDED]
    assert StepOutput.objects.filter(step_run=step_run).count() == 1
    record = IdempotencyRecord.objects.get(scope="step", key=step_run.idempotency_key)
    assert record.status == RecordStatus.COMPLETED and record.attempt_count == 1
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.SUCCEEDED
    assert integrity_check().ok


def test_step_succeeds_once_when_its_backend_is_terminated_during_the_completion(counted_step, barrier, caplog):
    pipeline_input, step_run, calls, _ = counted_step()
    completion = barrier("pipeline_ops_stepoutput")
    completion.close_with("wait")
    worker = StepThread(step_run.pk)
    worker.start()
    wait_for(lambda: completion.parked_pid() is not None, timeout=60, message="the completion parked at the barrier")

    completion.terminate(completion.parked_pid())  # the server restarts under the open transaction
    completion.open()

    assert worker.result(120) == Outcome.SUCCEEDED
    assert_succeeded_once(pipeline_input, step_run, calls)
    assert any("infrastructure error" in r.getMessage() for r in caplog.records), "the lost connection was never seen"


def test_step_succeeds_once_when_a_lock_timeout_hits_its_completion(counted_step, barrier):
    pipeline_input, step_run, calls, _ = counted_step()
    completion = barrier("pipeline_ops_stepoutput")
    completion.close_with("timeout")
    worker = StepThread(step_run.pk)
    worker.start()
    # Two arrivals: the first timed out (lock_not_available) and the completion came back.
    wait_for(lambda: completion.hits() >= 2, timeout=60, message="a completion retried after its lock timeout")
    completion.open()

    assert worker.result(120) == Outcome.SUCCEEDED
    assert_succeeded_once(pipeline_input, step_run, calls)


class ClaimPausedAfterItsStepLock:
    """A worker whose claim stops between its step's row lock and its input's (the rest of the
    claim's transaction), until ``go_on()``. ``on_call``: which of the worker's step locks
    pauses (a claim on an existing key first tries an insert, which conflicts and rolls back;
    its second transaction is the locked path that holds the step while it decides)."""

    def __init__(self, monkeypatch, step_run_id: int, *, on_call: int = 1):
        self.steps_locked, self._go_on = threading.Event(), threading.Event()
        real_lock = step_services.step_rows_lock
        calls: list[int] = []
        self.worker = StepThread(step_run_id)

        def lock_then_pause(*, step_run_ids, input_id=None):
            mine = threading.current_thread() is self.worker
            if mine:
                calls.append(1)
            if not mine or len(calls) != on_call or self._go_on.is_set():
                return real_lock(step_run_ids=step_run_ids, input_id=input_id)
            real_lock(step_run_ids=step_run_ids)  # the step, as the claim does first
            self.steps_locked.set()
            assert self._go_on.wait(60), "the test never let the claim go on"
            real_lock(step_run_ids=[], input_id=input_id)  # then the input

        monkeypatch.setattr(step_services, "step_rows_lock", lock_then_pause)
        self.worker.start()
        assert self.steps_locked.wait(60), "the claim never locked its step"

    def go_on(self) -> None:
        self._go_on.set()


class NewKeyClaimWaitingForItsInput:
    """A worker's one-statement claim of a new key (``hotpath_postgresql.step_claim_new``) that
    holds its step's row lock and waits for its input's, which the test holds until ``go_on()``:
    the database's own lock order puts the claim exactly between its two locks, with no hook
    in the product's code."""

    def __init__(self, input_id, step_run_id: int):
        self._locked, self._go_on = threading.Event(), threading.Event()
        self._holder = threading.Thread(target=self._hold, args=(input_id,), daemon=True)
        self._holder.start()
        assert self._locked.wait(60), "the test never locked the input"
        self.worker = StepThread(step_run_id)
        self.worker.start()
        wait_for(
            lambda: _a_lock_is_waited_for("%WITH step AS%input_lock%"), timeout=60,
            message="the claim holding its step and waiting for its input",
        )

    def _hold(self, input_id) -> None:
        try:
            with transaction.atomic():
                list(PipelineInput.objects.select_for_update(no_key=True).filter(pk=input_id).values_list("pk", flat=True))
                self._locked.set()
                assert self._go_on.wait(60), "the test never let the claim go on"
        finally:
            connection.close()

    def go_on(self) -> None:
        self._go_on.set()
        self._holder.join(60)


class OperatorThread(threading.Thread):
    """An operator's action in a thread and connection of its own; ``pid`` is its backend."""

    def __init__(self, action):
        super().__init__(daemon=True)
        self.action, self.pid, self.result, self.error = action, None, None, None

    def run(self) -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                self.pid = cursor.fetchone()[0]
            self.result = self.action()
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            connection.close()

    def waits_on_a_lock(self) -> bool:
        return self.pid is not None and _waits_on_a_lock(self.pid)

    def finish(self):
        self.join(60)
        assert not self.is_alive(), "the operator's action never finished"
        if self.error:
            raise self.error  # a "deadlock detected" surfaces here
        return self.result


def test_operator_cancel_and_claiming_worker_both_finish_when_lined_up(counted_step):
    """The claim holds the step and is about to lock the input; the operator's cancel starts
    then. In the one lock order the cancel waits for the step; locking the input first (as the
    console's cancel once did) deadlocked, and PostgreSQL aborted the operator's cancel."""
    pipeline_input, step_run, calls, gate = counted_step(gated=True)
    claim = NewKeyClaimWaitingForItsInput(pipeline_input.pk, step_run.pk)
    operator = OperatorThread(lambda: inputs_cancel(inputs=[pipeline_input], actor=None, reason="customer withdrew it", source="cli"))
    operator.start()
    wait_for(operator.waits_on_a_lock, timeout=60, message="the cancel waiting on a row lock")
    claim.go_on()
    cancelled = operator.finish()  # no "deadlock detected"
    gate.set()

    assert cancelled.done == 1
    assert claim.worker.result(60) == Outcome.FENCED  # the claim won the step, the cancel fenced its attempt
    assert calls == [1]
    pipeline_input.refresh_from_db()
    step_run.refresh_from_db()
    assert pipeline_input.status == InputStatus.CANCELLED and step_run.status == StepStatus.CANCELLED
    assert [a.status for a in attempts_of(step_run)] == [AttemptStatus.FENCED]
    assert not StepOutput.objects.filter(step_run=step_run).exists()


def test_failure_and_the_steps_move_commit_together_when_a_claim_comes_in_between(fails_first_step, barrier):
    """The failing worker is parked after the key's FAILED and before its commit; a redelivery
    of the step (retry due at once) comes in then. It waits for the step's row lock instead of
    finding the key FAILED and the step still RUNNING, so the failure's move cannot overwrite
    its RUNNING afterwards (once, that turned its success into a terminal failure)."""
    pipeline_input, step_run, calls = fails_first_step
    failing = barrier("idempotency_attempt", "UPDATE", "NEW.status = 'FAILED'")
    failing.close_with("wait")
    first = StepThread(step_run.pk)
    first.start()
    wait_for(lambda: failing.parked_pid() is not None, timeout=60, message="the failure parked before its commit")
    redelivery = StepThread(step_run.pk)
    redelivery.start()
    wait_for(_a_step_lock_is_waited_for, timeout=60, message="the redelivery waiting for the step's row lock")
    failing.open()

    assert first.result(60) == Outcome.RETRY_SCHEDULED
    assert redelivery.result(60) == Outcome.SUCCEEDED
    assert calls == [1, 2]
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.SUCCEEDED and step_run.attempts_used == 2
    assert [a.status for a in attempts_of(step_run)] == [AttemptStatus.FAILED, AttemptStatus.SUCCEEDED]
    pipeline_input.refresh_from_db()
    assert pipeline_input.status == InputStatus.SUCCEEDED
    assert integrity_check().ok


def test_operator_retry_and_claiming_worker_both_finish_when_lined_up(fails_first_step, monkeypatch):
    """A step waits for its retry; a worker claims it (paused between the step's lock and the
    rest) while an operator clicks "Retry safely". The operator waits for the step, then sees it
    running and skips it; the worker runs it once. Nobody loses a deadlock."""
    pipeline_input, step_run, calls = fails_first_step
    first = StepThread(step_run.pk)
    first.start()
    assert first.result(60) == Outcome.RETRY_SCHEDULED  # attempt 1 failed; the step waits for its retry

    claim = ClaimPausedAfterItsStepLock(monkeypatch, step_run.pk, on_call=2)
    operator = OperatorThread(lambda: step_runs_retry(step_runs=[step_run], actor=None, reason="the provider is back", source="cli"))
    operator.start()
    wait_for(operator.waits_on_a_lock, timeout=60, message="the retry waiting on a row lock")
    claim.go_on()
    report = operator.finish()  # no "deadlock detected"

    assert claim.worker.result(60) == Outcome.SUCCEEDED
    assert report.done == 0 and report.skipped_total == 1  # it found the step running, or done
    assert calls == [1, 2]
    step_run.refresh_from_db()
    assert step_run.status == StepStatus.SUCCEEDED
    assert [a.status for a in attempts_of(step_run)] == [AttemptStatus.FAILED, AttemptStatus.SUCCEEDED]


def _a_step_lock_is_waited_for() -> bool:
    """Some backend waits on a row lock while locking step runs (the claim's first lock)."""
    return _a_lock_is_waited_for("%pipeline_ops_steprun%FOR NO KEY UPDATE%")


def _a_lock_is_waited_for(query_like: str) -> bool:
    """Some backend of this database waits on a lock while running a statement like ``query_like``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND query ILIKE %s",
            [query_like],
        )
        return cursor.fetchone()[0] > 0


def _waits_on_a_lock(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return bool(row) and row[0] == "Lock"


@pytest.mark.parametrize("ahead", ["+5s", "+120s"])
def test_worker_whose_clock_runs_ahead_never_takes_a_live_lease_over(counted_step, ahead):
    assert FAKETIME_LIB.exists(), "libfaketime is missing: `make browser` installs it"
    lease = 3.0  # the holder heartbeats every second; the skewed host is 5 s or 2 min ahead
    pipeline_input, step_run, calls, gate = counted_step(lease_seconds=lease, gated=True)
    holder = StepThread(step_run.pk)
    holder.start()
    wait_for(lambda: calls == [1], timeout=60, message="the holder running the step")

    settings_dict = connection.settings_dict
    assert settings_dict["NAME"].startswith("test_")
    url = f"postgres://{settings_dict['USER'] or 'postgres'}@{settings_dict['HOST'] or '127.0.0.1'}:{settings_dict['PORT'] or 5432}/{settings_dict['NAME']}"
    command = {"step_run_id": step_run.pk, "step": "counted", "pipeline": "fault_pipe", "lease": lease,
               "rounds": 8, "pause": lease / 2}
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": url, "PYTHONPATH": str(ROOT),
           "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": ahead, "FAKETIME_DONT_RESET": "1"}
    child = subprocess.run([sys.executable, "-m", "tests.pipeline.skew_child", json.dumps(command)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line[len("SKEW "):]) for line in child.stdout.splitlines() if line.startswith("SKEW ")]
    assert child.returncode == 0 and lines and lines[-1] == {"done": True}, child.stderr[-3000:]
    gate.set()

    assert lines[0]["host_ahead_seconds"] > int(ahead.strip("+s")) * 0.8, lines[0]  # the clock really was off
    rounds = lines[1:-1]
    assert len(rounds) == 8
    assert {r["outcome"] for r in rounds} == {Outcome.IN_FLIGHT}, rounds
    assert not any(r["expired_leases"] or r["due_retries"] or r["lost"] for r in rounds), rounds
    assert holder.result(60) == Outcome.SUCCEEDED
    assert_succeeded_once(pipeline_input, step_run, calls)
    assert StepOutput.objects.get(step_run=step_run).output == {"attempt": 1}


def test_worker_whose_clock_runs_ahead_completes_in_the_databases_time(counted_step):
    """A host two hours ahead runs and completes a step: every time its completion writes (the
    key's completion and expiry, the attempt's end, the step's end, the output's creation) is the
    database's, so the purge (which judges expiry on the database's clock) keeps the key for the
    retention, not the retention plus the host's error. With the host's clock the key would expire
    two hours late and the step would have finished in the future."""
    assert FAKETIME_LIB.exists(), "libfaketime is missing: `make browser` installs it"
    from idempotency import conf as idempotency_conf
    from idempotency.clock import db_now

    pipeline_input, step_run, _, _ = counted_step()
    settings_dict = connection.settings_dict
    url = f"postgres://{settings_dict['USER'] or 'postgres'}@{settings_dict['HOST'] or '127.0.0.1'}:{settings_dict['PORT'] or 5432}/{settings_dict['NAME']}"
    command = {"step_run_id": step_run.pk, "step": "counted", "pipeline": "fault_pipe", "lease": 30.0, "rounds": 1, "pause": 0}
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": url, "PYTHONPATH": str(ROOT),
           "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": "+7200s", "FAKETIME_DONT_RESET": "1"}
    child = subprocess.run([sys.executable, "-m", "tests.pipeline.skew_child", json.dumps(command)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line[len("SKEW "):]) for line in child.stdout.splitlines() if line.startswith("SKEW ")]
    assert child.returncode == 0 and lines and lines[-1] == {"done": True}, child.stderr[-3000:]
    assert lines[0]["host_ahead_seconds"] > 7000, lines[0]  # the clock really was off
    assert lines[1]["outcome"] == Outcome.SUCCEEDED, lines

    now = db_now()
    hour = 3600
    record = IdempotencyRecord.objects.get(scope="step", key=step_run.idempotency_key)
    attempt = Attempt.objects.get(record=record)
    step_run.refresh_from_db()
    output = StepOutput.objects.get(step_run=step_run)
    for name, moment in {"completed_at": record.completed_at, "record updated_at": record.updated_at,
                         "attempt finished_at": attempt.finished_at, "step finished_at": step_run.finished_at,
                         "output created_at": output.created_at}.items():
        assert moment <= now, f"{name} is in the database's future: {moment} > {now}"
    retention = idempotency_conf.get("RETENTION_HOURS") * hour
    assert (record.expires_at - now).total_seconds() <= retention, (record.expires_at, now)
