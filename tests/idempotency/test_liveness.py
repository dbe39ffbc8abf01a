"""Liveness beyond the lease (idempotency.heartbeat, idempotency.liveness) with real processes,
real SIGKILLs and a real PostgreSQL.

A holder is a separate interpreter (``liveness_child.py``) that claims through the guard and runs
under the heartbeat, as an API request does. The takeover tests wait for the dead holder's
*database session* to end (that is what PostgreSQL sees of a death) and then claim exactly once.
The heartbeat tests run on SQLite too (the lease is extended there; only the lock is PostgreSQL's).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, connections

from idempotency import guard, liveness
from idempotency.api import idempotent
from idempotency.clock import db_now
from idempotency.heartbeat import Heartbeat
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from tests.testapp.models import Charge, Receipt

from .helpers import FP, OPERATION, SCOPE

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]
LONG_LEASE = 300  # a lease that certainly outlives every test here: only the lock can free the key


def _database_url() -> str:
    cfg = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{cfg['NAME']}"
    auth = (cfg["USER"] or "postgres") + (f":{cfg['PASSWORD']}" if cfg["PASSWORD"] else "")
    return f"postgres://{auth}@{cfg['HOST'] or '127.0.0.1'}:{cfg['PORT'] or 5432}/{cfg['NAME']}"


class Holder:
    """A child process holding ``key`` under the guard and its heartbeat."""

    def __init__(self, key: str, *, lease: float = LONG_LEASE, lock: bool = True, max_attempts: int | None = None):
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": _database_url(), "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "tests.idempotency.liveness_child", SCOPE, key, str(lease)]
        if not lock:
            argv.append("--no-lock")
        if max_attempts is not None:
            argv += ["--max-attempts", str(max_attempts)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.ready = self.read()
        assert "attempt" in self.ready, self.ready
        self.attempt = Attempt.objects.get(pk=self.ready["attempt"])

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"holder {self.proc.pid} died: {self.proc.stderr.read()}")
            if line.startswith("HOLDER "):
                return json.loads(line[len("HOLDER "):])

    def kill(self) -> float:
        """SIGKILL the holder; returns the monotonic time of the kill."""
        killed_at = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        return killed_at

    def complete(self) -> dict:
        self.proc.stdin.write("complete\n")
        self.proc.stdin.flush()
        answer = self.read()
        self.proc.wait(timeout=10)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(key: str, **kwargs) -> Holder:
        holder = Holder(key, **kwargs)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.close()


def lock_holder_pids(record_id: int) -> list[int]:
    """Backends holding ``record_id``'s liveness lock (the two-key form: classid, objid, objsubid 2)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s AND objid = %s AND objsubid = 2",
            [liveness.NAMESPACE, liveness.lock_key(record_id)],
        )
        return [row[0] for row in cursor.fetchall()]


def wait_until_session_ended(pid: int, *, timeout: float = 10) -> float:
    """Wait for backend ``pid`` to leave pg_stat_activity; returns how long that took."""
    started = time.monotonic()
    while True:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
            if cursor.fetchone()[0] == 0:
                return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"backend {pid} still there {timeout} s after its client died"
        time.sleep(0.005)


def claim(key: str, **kwargs):
    return guard.claim(scope=SCOPE, key=key, operation=OPERATION, fingerprint=FP, lease_seconds=LONG_LEASE, **kwargs)


# --- PostgreSQL: a dead holder is seen at once ----------------------------------------------------


@pytest.mark.postgres
def test_claimer_takes_over_at_once_when_the_holders_process_was_sigkilled(holders):
    holder = holders("killed")
    assert holder.ready["lock_held"] is True
    record = IdempotencyRecord.objects.get(scope=SCOPE, key="killed")
    assert Attempt.objects.get(pk=holder.attempt.pk).liveness_lock is True
    [backend] = lock_holder_pids(record.pk)
    assert isinstance(claim("killed"), guard.InFlight)  # alive: its lease and its lock hold the key

    killed_at = holder.kill()
    wait_until_session_ended(backend)
    outcome = claim("killed")
    took = time.monotonic() - killed_at
    print(f"\ntakeover of a SIGKILLed holder: {took * 1000:.0f} ms after the kill (lease {LONG_LEASE} s)")

    assert isinstance(outcome, guard.Claimed), outcome
    assert outcome.attempt.number == 2
    assert record.lease_expires_at > db_now() + timedelta(seconds=LONG_LEASE - 60)  # the old lease was still long
    dead = Attempt.objects.get(pk=holder.attempt.pk)
    assert (dead.status, dead.error_type, dead.error_message) == (
        AttemptStatus.TIMED_OUT, "HolderGone", "holder's session ended; superseded",
    )
    assert took < 10  # generous on a busy machine; the print says what it really was


@pytest.mark.postgres
def test_live_holder_is_never_taken_over_when_its_lock_is_held(holders):
    holder = holders("alive")
    assert holder.ready["lock_held"] is True
    record = IdempotencyRecord.objects.get(scope=SCOPE, key="alive")
    assert lock_holder_pids(record.pk)  # held by the holder's heartbeat session
    for _ in range(5):
        outcome = claim("alive")
        assert isinstance(outcome, guard.InFlight), outcome
    assert Attempt.objects.get(pk=holder.attempt.pk).status == AttemptStatus.RUNNING
    assert IdempotencyRecord.objects.get(pk=record.pk).attempt_count == 1

    assert holder.complete() == {"completed": True, "stopped": False}  # it still held the key
    assert lock_holder_pids(record.pk) == []  # released with its ending
    assert isinstance(claim("alive"), guard.Replay)


@pytest.mark.postgres
def test_dead_holder_keeps_its_key_for_the_lease_when_it_held_no_lock(holders):
    holder = holders("lockless", lock=False)
    assert holder.ready["lock_held"] is False
    assert Attempt.objects.get(pk=holder.attempt.pk).liveness_lock is False
    record = IdempotencyRecord.objects.get(scope=SCOPE, key="lockless")
    holder.kill()
    time.sleep(0.2)  # nothing to wait for: no session can say anything about this holder

    outcome = claim("lockless")
    assert isinstance(outcome, guard.InFlight), outcome  # only the lease speaks for it
    assert outcome.until == record.lease_expires_at
    after_lease = claim("lockless", now=record.lease_expires_at + timedelta(seconds=1))
    assert isinstance(after_lease, guard.Claimed)
    dead = Attempt.objects.get(pk=holder.attempt.pk)
    assert (dead.status, dead.error_type) == (AttemptStatus.TIMED_OUT, "LeaseExpired")


@pytest.mark.postgres
def test_dead_holder_is_dead_lettered_when_it_was_the_last_attempt_allowed(holders):
    holder = holders("last-chance", max_attempts=1)
    record = IdempotencyRecord.objects.get(scope=SCOPE, key="last-chance")
    [backend] = lock_holder_pids(record.pk)
    holder.kill()
    wait_until_session_ended(backend)

    outcome = claim("last-chance", max_attempts=1)
    assert isinstance(outcome, guard.Failed), outcome
    assert outcome.record.status == RecordStatus.FAILED
    assert outcome.record.error_summary == "gave up: 1 attempts started, the last holder's session ended"
    assert Attempt.objects.get(pk=holder.attempt.pk).status == AttemptStatus.TIMED_OUT


@pytest.mark.postgres
def test_nothing_is_taken_over_when_liveness_locks_are_off(holders, settings):
    holder = holders("setting-off")
    record = IdempotencyRecord.objects.get(scope=SCOPE, key="setting-off")
    [backend] = lock_holder_pids(record.pk)
    holder.kill()
    wait_until_session_ended(backend)
    settings.IDEMPOTENCY = {**settings.IDEMPOTENCY, "LIVENESS_LOCKS": False}  # e.g. behind PgBouncer
    assert isinstance(claim("setting-off"), guard.InFlight)


# --- the heartbeat (both databases) ---------------------------------------------------------------


def test_block_longer_than_its_lease_keeps_its_key_when_it_heartbeats():
    lease = 1.0
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_charge():
        try:
            with idempotent(scope=SCOPE, key="slow", operation=OPERATION, fingerprint=FP, lease_seconds=lease) as run:
                inside.set()
                assert release.wait(60)
                run.complete({"receipt": "r-slow"}, write=lambda: Receipt.objects.create(key="slow", amount=5, attempt_number=run.attempt.number))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    worker = threading.Thread(target=slow_charge)
    worker.start()
    assert inside.wait(30)
    started = time.monotonic()
    seen = 0
    while time.monotonic() - started < 4 * lease:  # four leases long: without a heartbeat it is taken at 1 s
        outcome = guard.claim(scope=SCOPE, key="slow", operation=OPERATION, fingerprint=FP, lease_seconds=lease)
        assert isinstance(outcome, guard.InFlight), f"taken over after {time.monotonic() - started:.1f} s: {outcome}"
        seen += 1
        time.sleep(0.1)
    release.set()
    worker.join(30)
    assert not errors, errors
    assert seen >= 10
    assert Receipt.objects.count() == 1
    record = IdempotencyRecord.objects.get(scope=SCOPE, key="slow")
    assert (record.status, record.attempt_count) == (RecordStatus.COMPLETED, 1)
    assert list(record.attempts.values_list("status", flat=True)) == [AttemptStatus.SUCCEEDED]
    assert record.attempts.get().heartbeat_at is not None


def test_heartbeat_sets_the_stop_event_when_a_newer_attempt_took_the_key():
    first = guard.claim(scope=SCOPE, key="taken", operation=OPERATION, fingerprint=FP, lease_seconds=0.3)
    stop = threading.Event()
    with Heartbeat(attempt=first.attempt, lease_seconds=0.3, stop_event=stop) as heartbeat:
        later = db_now() + timedelta(hours=1)
        newer = guard.claim(scope=SCOPE, key="taken", operation=OPERATION, fingerprint=FP, lease_seconds=30, now=later)
        assert isinstance(newer, guard.Claimed)
        assert stop.wait(10)
        assert heartbeat.fenced is stop
    assert IdempotencyRecord.objects.get(scope=SCOPE, key="taken").attempt_count == 2


# --- the process's one liveness session (PostgreSQL) ----------------------------------------------


def _wait_for(condition, *, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.02)


def liveness_backends(pid: int | None = None) -> list[int]:
    """Backends of process ``pid``'s (default: this one's) liveness session(s)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database() ORDER BY pid",
            [f"{liveness.APPLICATION_NAME}:{pid or os.getpid()}"],
        )
        return [row[0] for row in cursor.fetchall()]


class Held(threading.Thread):
    """An ``idempotent`` block of this process, held open until ``go`` is set; it then completes
    with a write of a Charge (no unique constraint: only fencing keeps a key to one)."""

    def __init__(self, key: str, *, lease: float = LONG_LEASE):
        super().__init__(daemon=True)
        self.key, self.lease = key, lease
        self.entered, self.go = threading.Event(), threading.Event()
        self.run_, self.error = None, None

    def run(self):
        try:
            with idempotent(scope=SCOPE, key=self.key, operation=OPERATION, fingerprint=FP, lease_seconds=self.lease) as run:
                self.run_ = run
                self.entered.set()
                assert self.go.wait(60)
                run.complete({"by": run.attempt.number}, write=lambda: Charge.objects.create(key=self.key, attempt_number=run.attempt.number))
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        finally:
            self.entered.set()
            connections.close_all()

    def finish(self):
        self.go.set()
        self.join(30)
        assert not self.is_alive() and self.error is None, self.error


@pytest.fixture
def held_blocks():
    started: list[Held] = []

    def start(*keys: str, **kwargs) -> list[Held]:
        blocks = [Held(key, **kwargs) for key in keys]
        started.extend(blocks)
        for block in blocks:
            block.start()
        for block in blocks:
            assert block.entered.wait(30) and block.error is None, block.error
        return blocks

    yield start
    for block in started:
        block.go.set()
        block.join(30)


@pytest.mark.postgres
def test_concurrent_attempts_share_one_liveness_session_when_they_run_in_one_process(held_blocks):
    session = liveness.session()
    connects = session.connects
    blocks = held_blocks(*(f"many-{i}" for i in range(6)))
    records = {block.key: block.run_.attempt.record_id for block in blocks}
    backend = session.backend_pid
    # One connection for all six, however many were live at once: no connection per attempt.
    assert session.connects - connects <= 1
    assert liveness_backends() == [backend]
    assert backend != connection.connection.info.backend_pid
    for key, record_id in records.items():
        assert lock_holder_pids(record_id) == [backend], key  # stacked in the one session
    assert Attempt.objects.filter(record_id__in=records.values(), liveness_lock=True).count() == 6
    # Each lock is held while its attempt runs, and given back after its ending committed (with
    # the session's next statement: at most liveness.CHECK_SECONDS later), never before.
    for done, block in enumerate(blocks):
        assert lock_holder_pids(records[block.key]) == [backend], block.key
        block.finish()
        assert not block.run_.fenced
        _wait_for(lambda key=block.key: lock_holder_pids(records[key]) == [], what=f"{block.key}'s lock given back")
        for later in blocks[done + 1:]:
            assert lock_holder_pids(records[later.key]) == [backend], later.key
    assert session.connects - connects <= 1 and liveness_backends() in ([backend], [])
    assert Charge.objects.count() == 6
    # With no attempt left the session closes after a while: a quiet process keeps no idle connection.
    _wait_for(lambda: liveness_backends() == [], what="the idle session's close")


@pytest.mark.postgres
def test_locks_are_taken_again_on_a_new_session_when_the_liveness_session_was_terminated(held_blocks, caplog):
    blocks = held_blocks(*(f"cut-{i}" for i in range(4)))
    records = {block.key: block.run_.attempt.record_id for block in blocks}
    session = liveness.session()
    first = session.backend_pid
    assert all(lock_holder_pids(record_id) == [first] for record_id in records.values())

    # The window: the session is gone and the process has not noticed yet. Holding the session's
    # lock keeps it open (the process can neither notice nor take anything again meanwhile), so a
    # retry that comes in the window is certain to find a live holder's lock free.
    with session.lock:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [first])
        wait_until_session_ended(first)
        takeover = claim("cut-0")
    assert isinstance(takeover, guard.Claimed), takeover  # wrongful: cut-0's holder is alive
    assert takeover.attempt.number == 2

    # The process notices by itself and takes the locks again on a new session, except cut-0's:
    # that attempt lost its key for good, and the lock is left to its successor.
    _wait_for(lambda: session.backend_pid not in (None, first), what="a new liveness session")
    second = session.backend_pid
    for key in ("cut-1", "cut-2", "cut-3"):
        _wait_for(lambda key=key: lock_holder_pids(records[key]) == [second], what=f"{key}'s lock on the new session")
    assert lock_holder_pids(records["cut-0"]) == []
    assert liveness_backends() == [second]
    assert "the liveness session (backend" in caplog.text

    # No live attempt is taken over for good: the others are in flight, every one of them.
    for key in ("cut-1", "cut-2", "cut-3"):
        assert isinstance(claim(key), guard.InFlight), key
    # The one taken over in the window is fenced: its completion is refused, its write rolled back.
    for block in blocks:
        block.finish()
    assert blocks[0].run_.fenced
    assert not any(block.run_.fenced for block in blocks[1:])
    assert guard.complete(
        attempt=takeover.attempt, result={"by": 2}, write=lambda: Charge.objects.create(key="cut-0", attempt_number=2),
    ).fenced is False
    assert sorted(Charge.objects.values_list("key", "attempt_number")) == [("cut-0", 2), ("cut-1", 1), ("cut-2", 1), ("cut-3", 1)]
    assert Attempt.objects.get(pk=blocks[0].run_.attempt.pk).status == AttemptStatus.FENCED


@pytest.mark.postgres
def test_successor_keeps_the_lock_when_its_superseded_predecessor_in_the_same_process_ends():
    first = claim("twin")
    old = Heartbeat(attempt=first.attempt, lease_seconds=LONG_LEASE).__enter__()
    new = None
    try:
        backend = liveness.session().backend_pid
        assert old.lock_held
        # The old attempt's lease "ran out" (as a claim with a later clock sees it) while it is
        # still working: a takeover that happens to run in the same process.
        second = claim("twin", now=db_now() + timedelta(seconds=LONG_LEASE + 1))
        assert isinstance(second, guard.Claimed) and second.attempt.number == 2
        new = Heartbeat(attempt=second.attempt, lease_seconds=LONG_LEASE).__enter__()
        assert new.lock_held  # the same session holds it once more: the locks stack
        assert Attempt.objects.get(pk=second.attempt.pk).liveness_lock is True

        old.stop()  # the superseded attempt ends: its share of the lock goes, the successor's stays
        _wait_for(lambda: not liveness.session().unlock_due, what="the old attempt's unlock sent")
        assert lock_holder_pids(first.attempt.record_id) == [backend]
        assert isinstance(claim("twin"), guard.InFlight)  # not "gone": its lock is held

        new.stop()  # without completing, as a process that dies mid-work
        _wait_for(lambda: lock_holder_pids(first.attempt.record_id) == [], what="the lock given back")
        took = claim("twin")
        assert isinstance(took, guard.Claimed) and took.attempt.number == 3
        assert Attempt.objects.get(pk=second.attempt.pk).error_type == "HolderGone"
    finally:
        old.stop()
        if new is not None:
            new.stop()


@pytest.mark.postgres
def test_forked_child_opens_its_own_liveness_session_when_the_parent_holds_locks():
    parent_claim = claim("fork-parent")
    child_claim = claim("fork-child")
    with Heartbeat(attempt=parent_claim.attempt, lease_seconds=LONG_LEASE) as heartbeat:
        assert heartbeat.lock_held
        session = liveness.session()
        parent_backend = session.backend_pid
        connections.close_all()  # the test's own Django connection: not this test's subject
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            report: dict = {}
            try:
                with Heartbeat(attempt=child_claim.attempt, lease_seconds=LONG_LEASE) as child_heartbeat:
                    mine = liveness.session()
                    report = {
                        "backend": mine.backend_pid, "locked": child_heartbeat.lock_held, "same_session": mine is session,
                        "holders": lock_holder_pids(child_claim.attempt.record_id),
                    }
                del mine
                import gc

                gc.collect()  # whatever the child still had of the parent's session is finalized here
                liveness.session().close()
                connections.close_all()
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                report = {"error": repr(exc)}
            os.write(writer, json.dumps(report).encode())
            os._exit(0)
        os.close(writer)
        with os.fdopen(reader) as pipe:
            report = json.loads(pipe.read())
        os.waitpid(child, 0)
        assert "error" not in report, report
        assert report["same_session"] is False
        assert report["locked"] is True
        assert report["backend"] != parent_backend
        assert report["holders"] == [report["backend"]]
        # The parent's session went through the child's life and death untouched.
        assert session.backend_pid == parent_backend and heartbeat.lock_held
        assert lock_holder_pids(parent_claim.attempt.record_id) == [parent_backend]
        assert liveness_backends() == [parent_backend]
        wait_until_session_ended(report["backend"])
        assert isinstance(claim("fork-parent"), guard.InFlight)
    _wait_for(lambda: lock_holder_pids(parent_claim.attempt.record_id) == [], what="the parent's lock given back")


@pytest.mark.postgres
def test_heartbeat_beats_again_when_its_beat_connection_was_terminated(caplog):
    outcome = guard.claim(scope=SCOPE, key="blip", operation=OPERATION, fingerprint=FP, lease_seconds=0.6)
    record_id = outcome.attempt.record_id
    with Heartbeat(attempt=outcome.attempt, lease_seconds=0.6) as heartbeat:
        _wait_for(lambda: heartbeat.beats >= 1, what="a first beat")
        lock_backend = liveness.session().backend_pid

        def beat_backends():
            with connection.cursor() as cursor:
                cursor.execute(
                    # Neither this test's session nor the liveness session: the heartbeat thread's.
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND pid <> %s AND backend_type = 'client backend'",
                    [lock_backend],
                )
                return [row[0] for row in cursor.fetchall()]

        _wait_for(lambda: len(beat_backends()) == 1, what="the heartbeat thread's connection")
        [beat_backend] = beat_backends()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [beat_backend])
        # The next beat fails (logged, not raised), the one after reconnects.
        _wait_for(lambda: heartbeat.errors >= 1, what="a failed beat")
        beats = heartbeat.beats
        _wait_for(lambda: heartbeat.beats > beats + 1, what="beats after the reconnect")
        record = IdempotencyRecord.objects.get(pk=record_id)
        assert record.lease_expires_at > db_now()  # still extended: nobody could take it
        assert lock_holder_pids(record_id) == [lock_backend]  # the lock's session was not involved
        assert isinstance(guard.claim(scope=SCOPE, key="blip", operation=OPERATION, fingerprint=FP), guard.InFlight)
    assert "heartbeat of attempt" in caplog.text and "trying again at the next beat" in caplog.text
    _wait_for(lambda: lock_holder_pids(record_id) == [], what="the lock given back")


@pytest.mark.postgres
def test_lock_is_held_for_the_whole_block_when_idempotent_runs_on_postgresql():
    with idempotent(scope=SCOPE, key="spans", operation=OPERATION, fingerprint=FP) as run:
        assert Attempt.objects.filter(pk=run.attempt.pk, liveness_lock=True).exists()  # taken before the work
        [backend] = lock_holder_pids(run.attempt.record_id)
        assert backend == liveness.session().backend_pid != connection.connection.info.backend_pid
        run.complete({"ok": True})
        assert lock_holder_pids(run.attempt.record_id) == [backend]  # still held once the completion committed
    _wait_for(lambda: lock_holder_pids(run.attempt.record_id) == [], what="the lock given back")
