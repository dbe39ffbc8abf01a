"""The one classifier of errors, judged on errors that real databases raise, not on hand-made ones.

Infrastructure (retry the move, never a step's failure): a terminated backend, a lock timeout,
a statement timeout, a lost deadlock, a serialization failure, a closed connection, SQLite's
"database is locked". Domain (the work's own fault, the retry policy decides): a unique
violation, a value the database refuses, a missing table.
"""
from __future__ import annotations

import threading

import pytest
from django.db import DatabaseError, IntegrityError, OperationalError, connections
from django.db.utils import ConnectionHandler

from idempotency.faults import error_kind, is_infrastructure_error, is_infrastructure_error_type

def raised_by(run) -> DatabaseError:
    """The database error that ``run()`` raises; fails the test when it raises none."""
    with pytest.raises(DatabaseError) as caught:
        run()
    return caught.value


@pytest.fixture
def session():
    """Fresh Django connections to the test database, each its own PostgreSQL backend."""
    opened = []

    def open_session():
        wrapper = connections.create_connection("default")
        wrapper.ensure_connection()
        opened.append(wrapper)
        return wrapper

    yield open_session
    for wrapper in opened:
        try:
            wrapper.close()
        except DatabaseError:
            pass


def execute(wrapper, sql: str, params=None):
    with wrapper.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else None


def backend_pid(wrapper) -> int:
    return execute(wrapper, "SELECT pg_backend_pid()")[0][0]


# -- infrastructure, on PostgreSQL ------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_terminated_backend_is_infrastructure_on_the_query_and_on_the_next_one(session):
    worker, operator = session(), session()
    pid = backend_pid(worker)
    assert execute(operator, "SELECT pg_terminate_backend(%s)", [pid]) == [(True,)]

    first = raised_by(lambda: execute(worker, "SELECT 1"))
    assert is_infrastructure_error(first), repr(first)
    if worker.connection is not None and not worker.connection.closed:
        return  # the driver kept the socket; the first error is the one a step meets
    second = raised_by(lambda: execute(worker, "SELECT 1"))  # the closed connection, reused
    assert is_infrastructure_error(second), repr(second)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_lock_timeout_is_infrastructure(session):
    holder, waiter = session(), session()
    execute(holder, "SELECT pg_advisory_lock(424242)")
    execute(waiter, "SET lock_timeout = '50ms'")

    error = raised_by(lambda: execute(waiter, "SELECT pg_advisory_lock(424242)"))

    assert getattr(error.__cause__, "sqlstate", None) == "55P03"
    assert is_infrastructure_error(error) and error_kind(error) == "infrastructure"
    execute(holder, "SELECT pg_advisory_unlock(424242)")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_statement_timeout_is_infrastructure(session):
    slow = session()
    execute(slow, "SET statement_timeout = '50ms'")

    error = raised_by(lambda: execute(slow, "SELECT pg_sleep(5)"))

    assert getattr(error.__cause__, "sqlstate", None) == "57014"
    assert is_infrastructure_error(error)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_lost_deadlock_is_infrastructure(session):
    left, right = session(), session()
    left.inc_thread_sharing()  # left waits in a thread of its own
    for wrapper in (left, right):
        execute(wrapper, "SET deadlock_timeout = '50ms'")
        execute(wrapper, "SET lock_timeout = '20s'")  # a broken test fails instead of hanging
        wrapper.set_autocommit(False)
    execute(left, "SELECT pg_advisory_xact_lock(1)")
    execute(right, "SELECT pg_advisory_xact_lock(2)")
    errors: list[BaseException] = []
    left_waits = threading.Thread(target=lambda: _collect(errors, lambda: execute(left, "SELECT pg_advisory_xact_lock(2)")))
    left_waits.start()
    _collect(errors, lambda: execute(right, "SELECT pg_advisory_xact_lock(1)"))
    right.rollback()
    left_waits.join(30)
    left.rollback()
    left.dec_thread_sharing()

    assert not left_waits.is_alive()
    assert len(errors) == 1, errors  # exactly one side loses
    assert getattr(errors[0].__cause__, "sqlstate", None) == "40P01"
    assert is_infrastructure_error(errors[0])


def _collect(errors: list, run) -> None:
    try:
        run()
    except DatabaseError as exc:
        errors.append(exc)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_serialization_failure_is_infrastructure(session):
    first, second = session(), session()
    execute(first, "CREATE TABLE fault_probe (id int PRIMARY KEY, n int)")
    try:
        execute(first, "INSERT INTO fault_probe VALUES (1, 0)")
        first.set_autocommit(False)
        execute(first, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        execute(first, "SELECT n FROM fault_probe WHERE id = 1")  # the snapshot is taken
        execute(second, "UPDATE fault_probe SET n = 1 WHERE id = 1")  # committed (autocommit)

        error = raised_by(lambda: execute(first, "UPDATE fault_probe SET n = 2 WHERE id = 1"))

        assert getattr(error.__cause__, "sqlstate", None) == "40001"
        assert is_infrastructure_error(error)
        first.rollback()
        first.set_autocommit(True)
    finally:
        execute(second, "DROP TABLE IF EXISTS fault_probe")


# -- domain, on PostgreSQL ----------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("sql", "sqlstate"), [
    ("SELECT '\"\\u0000\"'::jsonb", "22P05"),            # a NUL in jsonb: the value, not the platform
    ("SELECT 1 / 0", "22012"),
    ("SELECT * FROM no_such_table_here", "42P01"),
    ("SELECT (1, 2) FROM (VALUES (1)) v(x) WHERE x = 'x'", "22P02"),
])
def test_errors_of_the_data_are_domain(session, sql, sqlstate):
    wrapper = session()

    error = raised_by(lambda: execute(wrapper, sql))

    assert getattr(error.__cause__, "sqlstate", None) == sqlstate
    assert not is_infrastructure_error(error) and error_kind(error) == "domain"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_unique_violation_is_domain(session):
    wrapper = session()
    execute(wrapper, "CREATE TEMPORARY TABLE unique_probe (k text UNIQUE)")
    execute(wrapper, "INSERT INTO unique_probe VALUES ('a')")

    error = raised_by(lambda: execute(wrapper, "INSERT INTO unique_probe VALUES ('a')"))

    assert isinstance(error, IntegrityError) and not is_infrastructure_error(error)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_stored_error_names_are_judged_like_the_errors(session):
    worker = session()
    execute(worker, "SET lock_timeout = '10ms'")
    holder = session()
    execute(holder, "SELECT pg_advisory_lock(77)")
    error = raised_by(lambda: execute(worker, "SELECT pg_advisory_lock(77)"))

    # What an Attempt stores: the class name and the message, then judged again by name.
    assert is_infrastructure_error_type(type(error.__cause__).__name__, str(error))
    assert is_infrastructure_error_type("OperationalError", str(error))
    assert not is_infrastructure_error_type("IntegrityError", "duplicate key")
    assert not is_infrastructure_error_type("PermanentStepError", "400 from the model")


# -- SQLite: every error is OperationalError; only some are the platform's ----------------------


@pytest.fixture
def sqlite_pair(tmp_path, django_db_blocker):
    """Two Django connections to a SQLite file of its own (not the suite's database), with a
    short busy timeout: runs in both passes."""
    handler = ConnectionHandler({
        alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "locks.sqlite3"), "OPTIONS": {"timeout": 0.05}}
        for alias in ("default", "other")
    })
    writer, other = handler.create_connection("default"), handler.create_connection("other")
    with django_db_blocker.unblock():
        yield writer, other
        for wrapper in (writer, other):
            wrapper.close()


def test_sqlite_database_is_locked_is_infrastructure(sqlite_pair):
    writer, other = sqlite_pair
    execute(writer, "CREATE TABLE t (x int)")
    writer.set_autocommit(False)
    execute(writer, "INSERT INTO t VALUES (1)")  # holds the write lock until commit

    error = raised_by(lambda: execute(other, "INSERT INTO t VALUES (2)"))

    assert isinstance(error, OperationalError) and "locked" in str(error)
    assert is_infrastructure_error(error)
    assert is_infrastructure_error_type("OperationalError", str(error), vendor="sqlite")
    writer.rollback()


def test_sqlite_missing_table_is_domain(sqlite_pair):
    writer, _ = sqlite_pair

    error = raised_by(lambda: execute(writer, "SELECT * FROM no_such_table_here"))

    assert isinstance(error, OperationalError)  # SQLite's class says nothing; the message does
    assert not is_infrastructure_error(error)
    assert not is_infrastructure_error_type("OperationalError", str(error), vendor="sqlite")
