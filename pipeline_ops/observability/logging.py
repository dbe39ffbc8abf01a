"""Structured logs: a JSON formatter, and a context (input id, step, attempt number, key) that
every log line written inside it carries, whichever logger writes it.

The context lives in a ``contextvars.ContextVar``: each worker process, thread and asyncio task
has its own, so two steps running side by side never mix their fields. The runner wraps one step
execution in it::

    from pipeline_ops.observability.logging import log_context

    with log_context(input_id=step_run.input_id, step=step_run.step, key=step_run.idempotency_key):
        ...  # claim
        with log_context(attempt=attempt.number):
            ...  # run, complete / fail: every log line has all four fields

Code with no block to wrap binds fields in one line, inside a function decorated with
``@log_context_isolated`` (so they end with the call)::

    @log_context_isolated
    def step_run_execute_task(step_run_id): ...
    log_context_bind(input_id=step_run.input_id, step=step_run.step, key=step_run.idempotency_key)
    log_context_bind(attempt=attempt.number)

``LOG_FORMAT=json`` in the environment switches the project's console handler to this formatter
(settings.LOGGING); the context filter is installed in both formats.
"""
from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# The deployment's name for this host (systemd: Environment=PIPELINE_OPS_HOST=%i), else the hostname.
_HOST = os.environ.get("PIPELINE_OPS_HOST") or socket.gethostname()

# The fields operators search logs by; always present in JSON lines (null when unknown).
CONTEXT_FIELDS = ("input_id", "step", "attempt", "key")

_context: ContextVar[dict[str, Any]] = ContextVar("pipeline_ops_log_context", default={})

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName", *CONTEXT_FIELDS}
)


def _clean(value: Any) -> Any:
    # UUIDs, datetimes and model pks become strings/numbers a log pipeline can index.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Add ``fields`` (e.g. input_id, step, attempt, key) to every log record inside the block.

    Nested blocks add to (and may override) the outer fields; leaving a block restores them.
    Fields set to None are removed for the block.
    """
    merged = _merged(fields)
    token = _context.set(merged)
    try:
        yield merged
    finally:
        _context.reset(token)


def log_context_bind(**fields: Any) -> None:
    """Add ``fields`` to the current context until the enclosing ``log_context`` block or
    ``log_context_isolated`` call ends: the one-line form for code that has no block to wrap."""
    _context.set(_merged(fields))


def _merged(fields: dict[str, Any]) -> dict[str, Any]:
    """The current context with ``fields`` added; a field set to None is removed."""
    merged = {**_context.get()}
    for name, value in fields.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = _clean(value)
    return merged


def log_context_isolated(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``func`` in a copy of the current context, so fields it binds vanish when
    it returns. Put it on task functions: a worker process runs task after task, and one task's
    input id must not stick to the next task's log lines."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return contextvars.copy_context().run(func, *args, **kwargs)

    return wrapper


def log_context_get() -> dict[str, Any]:
    """The fields in force here (a copy)."""
    return dict(_context.get())


class LogContextFilter(logging.Filter):
    """Copies the current log context onto each record (``record.input_id`` etc.), so text
    formats can use ``%(input_id)s`` and the JSON formatter finds them. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, context.get(name))
        for name, value in context.items():
            if name not in CONTEXT_FIELDS and not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the context fields,
    any ``extra=`` fields, host name and process id, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        context = _context.get()
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            line[name] = _clean(getattr(record, name, None) if hasattr(record, name) else context.get(name))
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and name not in line:
                line[name] = _clean(value) if not isinstance(value, (dict, list)) else value
        line["host"] = _HOST
        line["pid"] = record.process
        if record.exc_info:
            line["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            line["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["traceback"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)
