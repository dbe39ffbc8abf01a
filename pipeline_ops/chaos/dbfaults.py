"""Database faults for ``chaos --db-faults``: the workers' PostgreSQL backends die at random moments,
and their sessions run with a short ``lock_timeout``.

What a PostgreSQL restart, a failover, a pooler reconnect or an operator's ``pg_terminate_backend``
does to a worker is exactly this: the server ends the backend, and the worker's next (or current)
statement fails with ``AdminShutdown`` / "server closed the connection", an infrastructure error
(``idempotency.faults``). It must never make a step terminal, nor store a result twice.

How the driver finds the workers' connections: each chaos cluster gets
``PIPELINE_OPS_DB_APPLICATION_NAME`` in its environment, which ``settings.py`` passes to libpq as
``application_name``; the terminator only ever matches that name in this database, so the
driver's own connection, the test runner's and other sessions' are never touched. The lock
timeout (``PIPELINE_OPS_DB_LOCK_TIMEOUT_MS`` → ``-c lock_timeout=...``) is a session setting of
the workers' connections only: nothing on the server or the database is changed, so there is
nothing to reset afterwards.

PostgreSQL only (SQLite has no backends to terminate); the command refuses ``--db-faults`` there.
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

APPLICATION_NAME_ENV = "PIPELINE_OPS_DB_APPLICATION_NAME"
LOCK_TIMEOUT_ENV = "PIPELINE_OPS_DB_LOCK_TIMEOUT_MS"

# The candidates: client backends of the chaos clusters in this database, never our own.
_CANDIDATES = """
    SELECT pid, COALESCE(state, '') FROM pg_stat_activity
    WHERE application_name = %s AND datname = current_database()
      AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""


def db_faults_env(*, application_name: str, lock_timeout_ms: int) -> dict[str, str]:
    """The cluster environment that names the workers' connections and shortens their lock waits."""
    return {APPLICATION_NAME_ENV: application_name, LOCK_TIMEOUT_ENV: str(int(lock_timeout_ms))}


class BackendTerminator:
    """A thread that ``pg_terminate_backend``s one of the clusters' backends every ``interval``
    seconds on average (uniform jitter, seeded), until ``stop()``.

    Most victims (``busy_bias``) are caught inside a statement or a transaction (``active``,
    ``idle in transaction``): that is where a dying connection hurts (a claim, a completion, the
    outbox insert); the others are idle connections, which the worker finds dead at its next use. Now and then (``blip_rate``) every backend of the clusters dies at once, as in
    a server restart. It uses a connection of its own (psycopg, autocommit), not Django's, so it
    never shares a connection with the driver's thread.
    """

    def __init__(self, *, connect_params: dict, application_name: str, interval: float = 1.0,
                 seed: int = 7, busy_bias: float = 0.75, blip_rate: float = 0.05):
        self.connect_params = connect_params
        self.application_name = application_name
        self.interval = interval
        self.rng = random.Random(seed)
        self.busy_bias = busy_bias
        self.blip_rate = blip_rate
        self.counts: Counter = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-db-faults", daemon=True)

    def start(self) -> BackendTerminator:
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stop terminating (before the integrity checks) and return the counts."""
        self._stop.set()
        self._thread.join(timeout=10)
        return self.summary()

    def summary(self) -> dict:
        return {"backends_terminated": self.counts["terminated"],
                "backends_terminated_by_state": {k[6:]: v for k, v in self.counts.items() if k.startswith("state:")},
                "db_blips": self.counts["blips"], "terminator_errors": self.errors[:5]}

    def _run(self) -> None:
        import psycopg

        conn = None
        while not self._stop.wait(self.rng.uniform(0.2 * self.interval, 1.8 * self.interval)):
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(**self.connect_params, autocommit=True, connect_timeout=5)
                self._strike(conn)
            except psycopg.Error as exc:  # the driver's side must not die with the faults it injects
                self.errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                conn = None
        if conn is not None:
            conn.close()

    def _strike(self, conn) -> None:
        if self.rng.random() < self.blip_rate:
            victims = conn.execute(_CANDIDATES, [self.application_name]).fetchall()
            if victims:
                self.counts["blips"] += 1
        else:
            victims = self._one_victim(conn, want_busy=self.rng.random() < self.busy_bias)
        for pid, state in victims:
            # False when the backend ended by itself in between: not counted as our fault.
            if conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]:
                self.counts["terminated"] += 1
                self.counts[f"state:{state or 'unknown'}"] += 1

    def _one_victim(self, conn, *, want_busy: bool) -> list[tuple[int, str]]:
        """One backend; ``want_busy``: watch for up to half an interval for one inside a statement
        or a transaction (a worker's statements last milliseconds, so a single look mostly finds
        idle connections), then take any."""
        deadline = time.monotonic() + self.interval / 2
        while True:
            candidates = conn.execute(_CANDIDATES, [self.application_name]).fetchall()
            busy = [c for c in candidates if c[1] in ("active", "idle in transaction")]
            if busy and want_busy:
                return [self.rng.choice(busy)]
            if not want_busy or time.monotonic() >= deadline or self._stop.is_set():
                return [self.rng.choice(candidates)] if candidates else []
            time.sleep(0.005)


def connect_params_for(settings_dict: dict) -> dict:
    """psycopg connection parameters for the database Django is connected to (the test one in pytest)."""
    return {
        "dbname": settings_dict["NAME"], "user": settings_dict.get("USER") or "postgres",
        "password": settings_dict.get("PASSWORD") or None, "host": settings_dict.get("HOST") or "127.0.0.1",
        "port": settings_dict.get("PORT") or 5432, "application_name": "pipeline_ops_chaos_driver_faults",
    }
