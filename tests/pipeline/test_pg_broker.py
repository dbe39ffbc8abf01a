"""pipeline_ops.pg_broker on real PostgreSQL, with real OS processes and real faults, no mocks.

The dequeuers are forked from the test process (the parent closes its connections first, as
django-q2's sentinel does), each with its own connections. What each one was handed out is
counted independently of the mechanism under test: every child appends what it got to a file of
its own, and the test reads the files. No test asserts a duration; each waits for progress and
fails only when nothing moves for ``STALL_SECONDS``.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from django.db import connection, connections
from django_q.conf import Conf
from django_q.models import OrmQ

from pipeline_ops.pg_broker import PostgresBroker, notify_channel

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

# A wait fails when nothing has moved for this long (a bound for a broken broker, not a timing).
STALL_SECONDS = 60.0
_FORK = multiprocessing.get_context("fork")


def _queue(name: str) -> str:
    return f"pipeline_ops_broker_test_{name}_{os.getpid()}"


def _dequeuer(queue: str, out: str, stop: str, *, bulk: int, retry: float, poll: float, ack: bool) -> None:
    """A child: dequeue until ``stop`` exists, append ``<id> <payload>`` per message to ``out``."""
    Conf.BULK, Conf.RETRY, Conf.POLL = bulk, retry, poll
    broker = PostgresBroker(list_key=queue)
    try:
        with open(out, "a", buffering=1) as log:
            while not os.path.exists(stop):
                for ack_id, payload in broker.dequeue() or []:
                    log.write(f"{ack_id} {payload}\n")
                    if ack:
                        broker.acknowledge(ack_id)
    except BaseException as exc:  # the parent reads the error instead of a silent stall
        Path(out + ".error").write_text(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        broker.close()
        connections.close_all()


def _start(target, *args, **kwargs):
    connections.close_all()  # never share the parent's sockets with a child
    process = _FORK.Process(target=target, args=args, kwargs=kwargs, daemon=True)
    process.start()
    return process


def _got(paths: list[Path]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for path in paths:
        error = Path(str(path) + ".error")
        assert not error.exists(), error.read_text()
        if path.exists():
            counts.update(line.split(" ", 1)[1] for line in path.read_text().splitlines() if line)
    return counts


def _wait_for(condition, what: str):
    """Wait until ``condition()`` is truthy; fail when its value has not changed for STALL_SECONDS."""
    last, moved_at = object(), time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        if value != last:
            last, moved_at = value, time.monotonic()
        if time.monotonic() - moved_at > STALL_SECONDS:
            pytest.fail(f"no progress for {STALL_SECONDS:.0f} s waiting for {what}")
        time.sleep(0.05)


def _due(queue: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_q_ormq WHERE key = %s AND lock <= statement_timestamp()", [queue])
        return cursor.fetchone()[0]


def _listeners(queue: str) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query = %s ORDER BY pid",
            [f'LISTEN "{notify_channel(queue)}"'],
        )
        return [row[0] for row in cursor.fetchall()]


def _stop(processes, stop: Path, queue: str) -> None:
    stop.touch()
    with connection.cursor() as cursor:  # wake the idle ones (their poll may be an hour)
        cursor.execute("SELECT pg_notify(%s, '')", [notify_channel(queue)])
    for process in processes:
        process.join(STALL_SECONDS)
        if process.is_alive():
            process.kill()
            pytest.fail("a dequeuer did not stop")


@pytest.fixture
def broker(monkeypatch):
    monkeypatch.setattr(Conf, "BULK", 10)
    monkeypatch.setattr(Conf, "RETRY", 600)
    monkeypatch.setattr(Conf, "POLL", 0.05)
    made = []

    def make(queue: str) -> PostgresBroker:
        made.append(PostgresBroker(list_key=queue))
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_every_message_handed_out_once_when_16_processes_dequeue_one_table(tmp_path, broker):
    queue = _queue("race")
    messages = [f"m{i}" for i in range(2000)]
    producer = broker(queue)
    for start in range(0, len(messages), 500):
        producer.enqueue_many(messages[start:start + 500])
    outs = [tmp_path / f"child-{n}.txt" for n in range(16)]
    stop = tmp_path / "stop"
    # Half the children ack (delete) what they get, as django-q2's monitor does; half leave their
    # rows locked and keep dequeuing: a row whose lock is live must never come out again.
    children = [
        _start(_dequeuer, queue, str(out), str(stop), bulk=4, retry=600, poll=0.05, ack=n % 2 == 0)
        for n, out in enumerate(outs)
    ]
    try:
        _wait_for(lambda: _due(queue) == 0 or None, "every message to be taken")
        _wait_for(lambda: sum(_got(outs).values()) >= len(messages) or None, "every message to be written down")
        time.sleep(0.5)  # the children keep dequeuing meanwhile: a second hand-out would show now
    finally:
        _stop(children, stop, queue)
    got = _got(outs)
    duplicates = {m: n for m, n in got.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} messages handed out twice within their lock: {list(duplicates.items())[:5]}"
    assert set(got) == set(messages), f"lost: {sorted(set(messages) - set(got))[:5]}"
    assert sum(1 for out in outs if out.exists() and out.read_text()) > 1  # the dequeuers really raced
    # The unacked rows are still there, locked on the database's clock for retry seconds.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), bool_and(lock > statement_timestamp() + interval '500 seconds') FROM django_q_ormq WHERE key = %s",
            [queue],
        )
        left, all_locked = cursor.fetchone()
    assert left > 0 and all_locked


def _take_and_hang(queue: str, out: str) -> None:
    Conf.BULK, Conf.RETRY, Conf.POLL = 3, 3, 0.05
    broker = PostgresBroker(list_key=queue)
    taken = []
    while len(taken) < 3:
        taken += broker.dequeue() or []
    Path(out).write_text("\n".join(str(ack_id) for ack_id, _ in taken))
    time.sleep(3600)  # "running": until the SIGKILL


def test_killed_dequeuers_messages_handed_out_again_only_after_their_lock_expires(tmp_path, broker):
    queue = _queue("kill")
    producer = broker(queue)
    producer.enqueue_many(["k1", "k2", "k3"])
    out = tmp_path / "taken.txt"
    child = _start(_take_and_hang, queue, str(out))
    try:
        _wait_for(lambda: out.exists() and out.read_text(), "the child to take the messages")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    taken = {int(x) for x in out.read_text().split()}
    old_locks = dict(OrmQ.objects.filter(pk__in=taken).values_list("pk", "lock"))
    assert set(old_locks) == taken  # still queued: nobody acked them

    # Another dequeuer (retry 600 s) keeps asking. Each time it gets a row back, the time it took
    # it (its new lock - 600 s, on the database's clock) must be at or after the old lock.
    again: dict[int, float] = {}
    consumer = broker(queue)

    def take():
        for ack_id, _payload in consumer.dequeue() or []:
            again[ack_id] = again.get(ack_id, 0) + 1
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT lock - interval '600 seconds' >= %s FROM django_q_ormq WHERE id = %s", [old_locks[ack_id], ack_id]
                )
                assert cursor.fetchone()[0], f"message {ack_id} handed out again before its lock expired"
        return set(again) == taken or None

    _wait_for(take, "the killed dequeuer's messages to come back")
    assert all(n == 1 for n in again.values())


def test_queue_drains_when_listening_connection_is_terminated(tmp_path, broker):
    queue = _queue("listen")
    producer = broker(queue)
    out, stop = tmp_path / "got.txt", tmp_path / "stop"
    # poll = 1 h: only a NOTIFY, or the fallback polling while the listener is down, moves anything.
    child = _start(_dequeuer, queue, str(out), str(stop), bulk=4, retry=600, poll=3600, ack=True)
    try:
        producer.enqueue_many([f"a{i}" for i in range(20)])
        _wait_for(lambda: sum(_got([out]).values()) >= 20 or None, "the first batch")
        first = _wait_for(lambda: _listeners(queue), "the dequeuer to listen")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [first[0]])
            assert cursor.fetchone()[0]
        producer.enqueue_many([f"b{i}" for i in range(20)])
        _wait_for(lambda: sum(_got([out]).values()) >= 40 or None, "the batch sent while the listener was down")
        # The listener comes back (a new backend), and the queue keeps moving on its NOTIFYs.
        _wait_for(lambda: [pid for pid in _listeners(queue) if pid not in first], "a new listening connection")
        for i in range(5):
            producer.enqueue(f"c{i}")
            _wait_for(lambda i=i: _got([out]).get(f"c{i}") or None, f"message c{i}")
    finally:
        _stop([child], stop, queue)
    got = _got([out])
    assert set(got) == {f"a{i}" for i in range(20)} | {f"b{i}" for i in range(20)} | {f"c{i}" for i in range(5)}
    assert max(got.values()) == 1


def test_notify_wakes_idle_dequeuer_long_before_poll(tmp_path, broker):
    queue = _queue("wake")
    producer = broker(queue)
    out, stop = tmp_path / "got.txt", tmp_path / "stop"
    child = _start(_dequeuer, queue, str(out), str(stop), bulk=4, retry=600, poll=3600, ack=True)
    try:
        # Idle and listening: the child's dequeue statement ran (and found nothing) after its
        # LISTEN, so from here on only a NOTIFY (or an hour's poll) can hand it a message.
        def idle_after_listen():
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity l JOIN pg_stat_activity d ON d.pid <> l.pid "
                    "WHERE l.datname = current_database() AND l.query = %s AND d.datname = current_database() "
                    "AND d.query LIKE %s AND d.state = 'idle' AND d.query_start > l.query_start",
                    [f'LISTEN "{notify_channel(queue)}"', f"UPDATE %{queue}%"],
                )
                return cursor.fetchone()[0] or None

        _wait_for(idle_after_listen, "the dequeuer to wait on its listening connection")
        producer.enqueue("wake-1")
        _wait_for(lambda: _got([out]).get("wake-1") or None, "the NOTIFY to wake the dequeuer")
        # Inside a transaction the row and its NOTIFY are invisible until the commit (the outbox).
        from django.db import transaction

        with transaction.atomic():
            producer.enqueue("wake-2")
        _wait_for(lambda: _got([out]).get("wake-2") or None, "the NOTIFY sent at commit")
    finally:
        _stop([child], stop, queue)
    assert _got([out]) == {"wake-1": 1, "wake-2": 1}


def test_rolled_back_enqueue_leaves_no_row(broker):
    queue = _queue("rollback")
    producer = broker(queue)
    from django.db import transaction

    with pytest.raises(RuntimeError), transaction.atomic():
        producer.enqueue("gone")
        raise RuntimeError("roll back")
    assert not OrmQ.objects.filter(key=queue).exists()
    assert producer.dequeue() is None


def test_ack_deletes_nothing_when_row_already_gone(broker):
    queue = _queue("ack")
    producer = broker(queue)
    ack_id = producer.enqueue("once")
    assert producer.dequeue() == [(ack_id, "once")]
    OrmQ.objects.filter(pk=ack_id).delete()  # the step's completion deleted it in its transaction
    producer.acknowledge(ack_id)  # django-q2's monitor: no error, nothing to delete
    assert not OrmQ.objects.filter(key=queue).exists()


def test_dequeue_survives_terminated_backend(broker):
    queue = _queue("blip")
    producer = broker(queue)
    ack_id = producer.enqueue("after-blip")
    connection.ensure_connection()
    with connections["default"].cursor() as cursor:  # terminate our own backend, as a failover would
        pid = connection.connection.info.backend_pid
        with pytest.raises(Exception):
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    assert producer.dequeue() is None  # logged, the connection dropped, no exception for the pusher
    assert producer.dequeue() == [(ack_id, "after-blip")]


SKEWED_DEQUEUER = """
import json, time, django
django.setup()
from django.db import connection
from django_q.conf import Conf
from pipeline_ops.pg_broker import PostgresBroker
Conf.BULK, Conf.RETRY, Conf.POLL = 10, 600, 0.05
with connection.cursor() as cursor:
    cursor.execute("SELECT extract(epoch FROM statement_timestamp())")
    ahead = time.time() - float(cursor.fetchone()[0])
broker = PostgresBroker(list_key={queue!r})
got = []
for _ in range(5):
    got += [payload for _, payload in broker.dequeue() or []]
broker.close()
print("SKEW " + json.dumps({{"ahead": ahead, "got": got}}))
"""


def test_dequeuer_whose_clock_runs_an_hour_ahead_takes_due_rows_and_never_live_ones(broker):
    from tests.pipeline.test_db_faults import FAKETIME_LIB, ROOT

    assert FAKETIME_LIB.exists(), "libfaketime is missing: `make browser` installs it"
    queue = _queue("skew")
    producer = broker(queue)
    producer.enqueue_many(["live-1", "live-2"])
    assert len(producer.dequeue()) == 2  # held by a healthy worker: locked for 600 s on the database's clock
    producer.enqueue("due-1")
    settings_dict = connection.settings_dict
    url = (f"postgres://{settings_dict['USER'] or 'postgres'}@{settings_dict['HOST'] or '127.0.0.1'}:"
           f"{settings_dict['PORT'] or 5432}/{settings_dict['NAME']}")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": url, "PYTHONPATH": str(ROOT),
           "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": "+3600s", "FAKETIME_DONT_RESET": "1"}
    import json
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", SKEWED_DEQUEUER.format(queue=queue)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    lines = [json.loads(line[5:]) for line in child.stdout.splitlines() if line.startswith("SKEW ")]
    assert child.returncode == 0 and lines, child.stderr[-3000:]
    assert lines[0]["ahead"] > 3000  # its clock really was an hour off
    assert lines[0]["got"] == ["due-1"]  # django-q2's ORM broker (the host's clock) takes live-1 and live-2 too
