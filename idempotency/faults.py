"""Infrastructure errors versus domain errors: the one place that tells them apart.

An **infrastructure** error belongs to the platform, not to the work: the connection was lost, the
server is shutting down or restarting, the transaction lost a deadlock or a serialization check, a
lock or statement timeout fired. Retrying the same move later is correct, and such an error alone
must never make a step terminal or throw a finished result away.

A **domain** error belongs to the work: its own write broke a constraint (``IntegrityError``), a
value the database refuses (``DataError``: a NUL byte in jsonb), a bug (``ProgrammingError``).
Retrying it gives the same answer; the retry policy of the work decides.

Every caller that must tell the two apart (the guard's moves, the step runner, the chaos report)
asks ``is_infrastructure_error``; nobody matches exception classes or SQLSTATEs of their own.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connections

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATE classes and codes of PostgreSQL that say "the platform, not your data".
# https://www.postgresql.org/docs/current/errcodes-appendix.html
_INFRASTRUCTURE_SQLSTATE_CLASSES = frozenset({
    "08",  # connection exception (lost, refused, failure)
    "40",  # transaction rollback: serialization failure 40001, deadlock detected 40P01
    "53",  # insufficient resources: too many connections, out of memory, disk full
    "57",  # operator intervention: query canceled (statement timeout) 57014, admin/crash shutdown, cannot connect now
    "58",  # system error (I/O error)
})
_INFRASTRUCTURE_SQLSTATES = frozenset({
    "55P03",  # lock_not_available: lock_timeout, NOWAIT
    "25P03",  # idle_in_transaction_session_timeout
    "25P04",  # transaction_timeout (PostgreSQL 17)
})
# SQLSTATEs that Django reports as OperationalError although the data, not the platform, is at fault.
_DOMAIN_SQLSTATE_CLASSES = frozenset({"22", "23", "42"})  # data exception, integrity violation, syntax/access

# SQLite reports both kinds as OperationalError; only these messages are the platform's.
_SQLITE_INFRASTRUCTURE_MESSAGES = ("database is locked", "database table is locked", "disk i/o error", "unable to open database")


def _sqlstate(exc: BaseException) -> str | None:
    for link in _chain(exc):
        code = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        if code:
            return str(code)
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when ``exc`` is the platform's failure (retry the move), False when it is the work's.

    Looks at the whole cause chain, so Django's wrapped errors and psycopg's own are judged alike.
    """
    state = _sqlstate(exc)
    if state:
        if state in _INFRASTRUCTURE_SQLSTATES or state[:2] in _INFRASTRUCTURE_SQLSTATE_CLASSES:
            return True
        if state[:2] in _DOMAIN_SQLSTATE_CLASSES:
            return False
    for link in _chain(exc):
        if isinstance(link, InterfaceError):
            return True  # the connection is closed or unusable: never the data's fault
        if isinstance(link, OperationalError):
            if _from_sqlite(link):
                message = str(link).lower()
                return any(m in message for m in _SQLITE_INFRASTRUCTURE_MESSAGES)
            return True
        if _is_driver_connection_error(link):
            return True
    return False


def is_infrastructure_error_type(name: str, message: str = "", *, vendor: str = "postgresql") -> bool:
    """``is_infrastructure_error`` for an error known only by what an Attempt stored: its class name
    (``error_type``) and message. The exception is rebuilt (Django's ``django.db`` errors, psycopg's
    own and its SQLSTATE classes such as ``AdminShutdown`` or ``LockNotAvailable``) and judged by
    the same rules; ``vendor`` says which database raised it (on SQLite only some messages are
    the platform's). An unknown name (a step's own error, ``LeaseExpired``) is not infrastructure.
    """
    rebuilt = _error_from_type(name, message, vendor=vendor)
    return rebuilt is not None and is_infrastructure_error(rebuilt)


def _error_from_type(name: str, message: str, *, vendor: str) -> BaseException | None:
    import django.db

    try:
        import psycopg
        import psycopg.errors
        namespaces = (django.db, psycopg.errors, psycopg)
    except ImportError:  # pragma: no cover - psycopg is a dependency
        namespaces = (django.db,)
    for namespace in namespaces:
        cls = getattr(namespace, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__.split(".")[0] in {"django", "psycopg"}:
            break
    else:
        return None
    exc = cls(message)
    if vendor == "sqlite" and cls.__module__.startswith("django"):
        import sqlite3

        exc.__cause__ = sqlite3.OperationalError(message)  # how Django's wrapper chains SQLite's error
    return exc


def _from_sqlite(exc: BaseException) -> bool:
    cause = exc.__cause__
    return cause is not None and type(cause).__module__ == "sqlite3"


def _is_driver_connection_error(exc: BaseException) -> bool:
    """psycopg's own OperationalError/InterfaceError, raised outside Django's wrapper."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def error_kind(exc: BaseException) -> str:
    """``"infrastructure"`` or ``"domain"``: the word stored on attempts and shown to operators."""
    return "infrastructure" if is_infrastructure_error(exc) else "domain"


def connection_reset(using: str) -> None:
    """Drop a connection that an infrastructure error may have broken, so the next query reconnects.

    Only outside a transaction: inside one, the caller's atomic block owns the connection and
    rolls back first (Django refuses to close a connection in an atomic block).
    """
    connection = connections[using]
    if connection.in_atomic_block:
        return
    try:
        connection.close()
    except DatabaseError:
        pass  # already gone; Django forgets it either way


def retry_infrastructure(
    func: Callable[[], T],
    *,
    using: str,
    deadline_seconds: float,
    what: str,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``func`` (a whole transaction, idempotent or fenced) until it stops failing for the
    platform's reasons, with capped exponential backoff and jitter, for at most ``deadline_seconds``.

    Domain errors propagate at once; the last infrastructure error propagates when time runs out.
    The elapsed time is the host's monotonic clock: it measures our own patience, not a lease.
    """
    started = time.monotonic()
    delay = base_delay
    tries = 0
    while True:
        tries += 1
        try:
            return func()
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            elapsed = time.monotonic() - started
            if elapsed + delay > deadline_seconds:
                log.warning("%s: infrastructure error after %d tries in %.1fs, giving up: %s", what, tries, elapsed, exc)
                raise
            log.warning("%s: infrastructure error (try %d), retrying in %.2fs: %s", what, tries, delay, exc)
            connection_reset(using)
            sleep(delay * random.uniform(0.5, 1.0))
            delay = min(max_delay, delay * 2)
