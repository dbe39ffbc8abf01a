"""The database's clock: the one clock that decides leases, retry due times and staleness.

Hosts disagree about the time (NTP steps, a VM resumed from suspend, a container with a bad
clock); the database is the one place every worker, web server and reconciler shares. A lease
written from one host's clock and compared on another's lets a host that runs ahead take over
healthy work, and one that runs far enough ahead dead-letters it. So every timestamp that is
*compared to decide who may act* is written and compared in the database's time:

* inside a statement, ``db_now_expression()`` (``STATEMENT_TIMESTAMP()`` on PostgreSQL);
* where Python needs the value (to decide under a row lock, or to report it), ``db_now()`` reads
  it from the database, in the caller's transaction when there is one.

SQLite is embedded: the database's clock *is* the host's, read through SQLite itself.
Timestamps that only record when something happened (created, finished) may come from the
writer's clock: nothing is decided by them.
"""
from __future__ import annotations

from datetime import datetime, timezone as dt_timezone

from django.db import connections, router
from django.db.models import DateTimeField, Value
from django.db.models.functions import Now
from django.utils import timezone


def db_now(*, using: str | None = None, model=None) -> datetime:
    """The database's current time (aware, UTC). One round trip on PostgreSQL.

    ``statement_timestamp()``, not ``now()``: inside a long transaction ``now()`` is the
    transaction's start, which would make a lease look older than it is.
    """
    alias = using or (router.db_for_write(model) if model is not None else "default")
    connection = connections[alias]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT statement_timestamp()")
            value = cursor.fetchone()[0]
        elif connection.vendor == "sqlite":
            cursor.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")
            value = datetime.fromisoformat(cursor.fetchone()[0]).replace(tzinfo=dt_timezone.utc)
        else:  # pragma: no cover - other vendors: the ORM's NOW()
            return timezone.now()
    if timezone.is_naive(value):
        value = timezone.make_aware(value, dt_timezone.utc)
    return value.astimezone(dt_timezone.utc)


def db_now_expression(*, using: str = "default"):
    """The database's current time inside a statement (``Now()``: STATEMENT_TIMESTAMP on PostgreSQL).

    On SQLite the value is this host's clock (the database's, SQLite being embedded), sent as a
    parameter: SQLite stores datetimes as text, and its own ``strftime('now')`` writes another
    text format than Django's, which would break the equality matches of conditional updates.
    """
    if connections[using].vendor == "sqlite":
        return Value(timezone.now(), output_field=DateTimeField())
    return Now()
