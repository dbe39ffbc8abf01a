"""A scratch PostgreSQL database for one benchmark run: created on the server of ``url``, the
process's settings pointed at it, dropped (with its connections) when the run ends."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def scratch_database(url: str, *, name: str, script: str) -> Iterator[str]:
    """Yields the scratch database's URL; ``script`` names the benchmark in the error it raises
    for a server that is not PostgreSQL."""
    import dj_database_url
    import psycopg

    server = dj_database_url.parse(url)
    if "postgresql" not in server["ENGINE"]:
        raise SystemExit(f"{script} measures PostgreSQL: give a postgres:// --database-url")
    admin_dsn = dict(host=server["HOST"] or "127.0.0.1", port=server["PORT"] or 5432, user=server["USER"] or "postgres",
                     password=server["PASSWORD"] or None, dbname=server["NAME"] or "postgres")
    with psycopg.connect(**admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        scratch_url = url.rsplit("/", 1)[0] + f"/{name}"
        os.environ["DATABASE_URL"] = scratch_url
        yield scratch_url
    finally:
        from django.conf import settings

        if settings.configured:  # a parent that never set Django up holds no connection to close
            from django.db import connections

            connections.close_all()
        with psycopg.connect(**admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
