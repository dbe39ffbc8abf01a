"""The effects log: a count of step effects that no database constraint can hide.

``StepOutput`` is unique on (input, step), so counting its rows can never show a duplicate: a
guard bug would surface as an IntegrityError, not as a second row. This log has no constraint at
all. Every run that *believes it stored a step's result* appends one line:

* the guarded run, through ``pipeline_ops.signals.step_effect_committed`` (sent once by the
  attempt that completed a step, after its commit), and the chaos driver for any late write the
  guard accepted;
* the naive control run (``chaos.naive``), each time it INSERTs a result.

The same reader (``effects_count``) then counts both runs, so "duplicates" means the same thing on
both sides: effects beyond one per step key.

The file is JSON Lines, one effect per line, each written with a single ``write`` on an
``O_APPEND`` descriptor: the kernel positions every append at the end of the file atomically, so
lines from concurrent worker processes never interleave (each line is far below a page).

``PIPELINE_OPS_EFFECTS_LOG`` names the file; unset, nothing is connected and nothing is written
(production pays nothing). The worker clusters also log each task delivery (django-q2's
``pre_execute``) so the report can say how many deliveries a step took.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

EFFECTS_LOG_ENV = "PIPELINE_OPS_EFFECTS_LOG"
EFFECT = "effect"
DELIVERY = "delivery"


def effects_log_path() -> Path | None:
    """The log this process appends to, or None when the effects log is off."""
    value = os.environ.get(EFFECTS_LOG_ENV, "").strip()
    return Path(value) if value else None


def effect_append(*, key: str, source: str, attempt: int | None = None, kind: str = EFFECT,
                  path: Path | None = None, **extra) -> bool:
    """Append one line to the log (``path``, else the environment's); False when the log is off."""
    path = path or effects_log_path()
    if path is None:
        return False
    record = {"kind": kind, "key": key, "source": source, "attempt": attempt,
              "worker": f"{socket.gethostname()}:{os.getpid()}", "at": round(time.time(), 3), **extra}
    line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write on O_APPEND: atomic with respect to other appenders
    finally:
        os.close(fd)
    return True


def effects_read(path: Path) -> list[dict]:
    """Every line of the log (a missing file is an empty log; a torn last line is skipped)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # a process killed mid-line cannot happen with one write, but never crash the report
    return lines


def effects_count(lines: Iterable[dict], *, keys: Iterable[str]) -> dict:
    """Effects per step key over ``keys`` (every key the run had, so keys with no effect count as 0).

    ``duplicates`` = sum over keys of max(0, effects - 1); ``distribution`` maps an effect count
    to how many keys had it (``{"0": 2, "1": 148}``); ``max`` is the most effects any key had.
    Lines for keys outside ``keys`` (another run in the same file) are ignored.
    """
    keys = list(keys)
    wanted = set(keys)
    per_key = Counter({key: 0 for key in keys})
    for line in lines:
        if line.get("kind", EFFECT) == EFFECT and line.get("key") in wanted:
            per_key[line["key"]] += 1
    return _spread(per_key, name="effects")


def deliveries_count(lines: Iterable[dict], *, tasks: Iterable[str]) -> dict:
    """Task deliveries per task name (``step_run:<id>``, ``naive:<input>:<position>``) over ``tasks``."""
    tasks = list(tasks)
    wanted = set(tasks)
    per_task = Counter({task: 0 for task in tasks})
    for line in lines:
        if line.get("kind") == DELIVERY and line.get("key") in wanted:
            per_task[line["key"]] += 1
    spread = _spread(per_task, name="deliveries")
    spread["per_step"] = round(spread["total"] / len(tasks), 3) if tasks else 0.0
    return spread


def calls_count(calls_by_key: dict[str, int], *, keys: Iterable[str]) -> dict:
    """The model server's own per-key call counts, spread the same way (keys never called: 0)."""
    keys = list(keys)
    return _spread(Counter({key: int(calls_by_key.get(key, 0)) for key in keys}), name="calls")


def _spread(per_key: Counter, *, name: str) -> dict:
    distribution = Counter(per_key.values())
    return {
        "total": sum(per_key.values()),
        "keys": len(per_key),
        "duplicates": sum(max(0, n - 1) for n in per_key.values()),
        "max": max(per_key.values(), default=0),
        "distribution": {str(n): distribution[n] for n in sorted(distribution)},
        # The keys beyond one, for a reader who wants to look at them (capped: a report, not a dump).
        f"keys_with_more_than_one_{name}": sorted(k for k, n in per_key.items() if n > 1)[:20],
    }


# --- the receivers (connected in the worker clusters only when the log is on) ---------------------


def _on_step_effect_committed(sender, *, key: str, attempt_number: int, step_run_id: int, **kwargs) -> None:
    effect_append(key=key, source="guarded", attempt=attempt_number, step_run_id=step_run_id)


def _on_pre_execute(sender, *, task: dict, **kwargs) -> None:
    name = task.get("name") or ""
    if name:
        effect_append(key=name, source="worker", kind=DELIVERY)


def effects_connect() -> bool:
    """Connect the receivers when ``PIPELINE_OPS_EFFECTS_LOG`` is set (``PipelineOpsConfig.ready``)."""
    if effects_log_path() is None:
        return False
    from django_q.signals import pre_execute

    from pipeline_ops.signals import step_effect_committed

    step_effect_committed.connect(_on_step_effect_committed, dispatch_uid="chaos-effects-log")
    pre_execute.connect(_on_pre_execute, dispatch_uid="chaos-effects-deliveries")
    return True
