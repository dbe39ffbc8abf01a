"""The control group: the incident's plain retry loop, with no guard.

This is how the system that produced 100+ duplicate records worked, kept deliberately naive so
the chaos run can put honest numbers beside the guarded ones:

* one plain django-q2 task per step (``naive_step_task``) that computes the step, INSERTs its
  result and enqueues the next step, with no idempotency record, lease or fencing;
* the model call runs with a client timeout; on timeout the loop retries, and the timed-out call
  is *left running* in a background thread that INSERTs its result when the response finally
  arrives (exactly the incident);
* results go to a scratch table with no unique constraint (``chaos_naive_result``), created with
  raw SQL here and dropped at the start of every control run. No migration: it is not product data;
* every stored result is also appended to the effects log (``chaos.effects``) with the same
  function the guarded run uses, so one counter measures both runs' duplicates.

Everything else is identical to the guarded run: same model server and fault knobs, same
clusters, brokers, duplicate enqueues and SIGKILLs (``pipeline_ops.chaos.scenario``).
"""
from __future__ import annotations

import os
import random
import threading
import time
import unicodedata

import httpx
from django.db import close_old_connections, connection, connections
from django_q.tasks import async_task

from .effects import effect_append

TABLE = "chaos_naive_result"
TASK = "pipeline_ops.chaos.naive.naive_step_task"


def naive_table_reset() -> None:
    """Drop and create the scratch results table (no unique constraint, on purpose)."""
    pk = "INTEGER PRIMARY KEY AUTOINCREMENT" if connection.vendor == "sqlite" else "BIGSERIAL PRIMARY KEY"
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cursor.execute(
            f"CREATE TABLE {TABLE} (id {pk}, run VARCHAR(64) NOT NULL, input_id VARCHAR(64) NOT NULL, "
            "step VARCHAR(100) NOT NULL, source VARCHAR(16) NOT NULL, output TEXT NOT NULL, pid INTEGER NOT NULL)"
        )


def naive_table_drop() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")


def naive_counts(*, run: str) -> dict:
    """Rows, distinct (input, step) pairs, duplicates and late rows of one control run."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT COUNT(*), COUNT(DISTINCT input_id || ':' || step), "
            f"SUM(CASE WHEN source = 'late' THEN 1 ELSE 0 END) FROM {TABLE} WHERE run = %s",
            [run],
        )
        rows, distinct, late = cursor.fetchone()
        cursor.execute(
            f"SELECT input_id, step, COUNT(*) FROM {TABLE} WHERE run = %s GROUP BY input_id, step HAVING COUNT(*) > 1",
            [run],
        )
        duplicated = cursor.fetchall()
    return {
        "rows": rows or 0,
        "distinct": distinct or 0,
        "late_rows": late or 0,
        "duplicates": (rows or 0) - (distinct or 0),
        "duplicated_pairs": len(duplicated),
    }


def naive_finished_inputs(*, run: str, last_step: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT DISTINCT input_id FROM {TABLE} WHERE run = %s AND step = %s", [run, last_step])
        return {row[0] for row in cursor.fetchall()}


def _insert(*, run: str, input_id: str, step: str, source: str, output: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (run, input_id, step, source, output, pid) VALUES (%s, %s, %s, %s, %s, %s)",
            [run, input_id, step, source, output[:2000], os.getpid()],
        )
    # After the INSERT committed (autocommit): the same line the guarded run's winners append.
    effect_append(key=f"{input_id}:{step}", source=f"naive-{source}", run=run)


def _local_step(step: str, text: str) -> str:
    # Cheap stand-ins for the offline steps: the control group is about delivery, not NLP.
    if step == "preprocess":
        return " ".join(unicodedata.normalize("NFKC", text).split())
    return f"{step}:{len(text.split())} words"


def _late_writer(*, holder: dict, done: threading.Event, run: str, input_id: str, step: str) -> None:
    """The abandoned call: when its response finally arrives, it writes its result anyway."""
    done.wait()
    if holder.get("ok"):
        try:
            _insert(run=run, input_id=input_id, step=step, source="late", output=holder["text"])
        finally:
            connections["default"].close()  # this thread's own connection


def _call_model(*, url: str, key: str, text: str, hard_timeout: float, holder: dict, done: threading.Event) -> None:
    try:
        response = httpx.post(
            f"{url.rstrip('/')}/v1/chat/completions",
            json={"model": "chaos", "messages": [{"role": "user", "content": text}]},
            headers={"Idempotency-Key": key}, timeout=hard_timeout,
        )
        holder["status"] = response.status_code
        if response.status_code == 200:
            holder["ok"] = True
            holder["text"] = response.json()["choices"][0]["message"]["content"]
    except Exception as exc:  # noqa: BLE001 - the naive loop treats every failure alike
        holder["error"] = repr(exc)
    finally:
        done.set()


def naive_step_task(
    run: str, input_id: str, position: int, text: str, steps: list[str], model_url: str,
    client_timeout: float, max_tries: int = 5, stall_seconds: float = 5.0,
) -> str:
    """Run one step the naive way, INSERT its result, enqueue the next step."""
    step = steps[position]
    source = "first"
    if step == "llm":
        output = None
        for attempt in range(1, max_tries + 1):
            holder: dict = {}
            done = threading.Event()
            caller = threading.Thread(
                target=_call_model, daemon=True,
                kwargs={"url": model_url, "key": f"{input_id}:{step}", "text": text,
                        "hard_timeout": stall_seconds + client_timeout + 30, "holder": holder, "done": done},
            )
            caller.start()
            if done.wait(client_timeout):
                if holder.get("ok"):
                    output, source = holder["text"], ("first" if attempt == 1 else "retry")
                    break
                time.sleep(min(2.0, 0.2 * 2 ** attempt) * random.random())  # 5xx / 429: back off, retry
                continue
            # Client timeout: give up on this call and retry, but the call is still in flight and
            # its handler will still write when the late response comes in (the incident).
            threading.Thread(
                target=_late_writer, daemon=True,
                kwargs={"holder": holder, "done": done, "run": run, "input_id": input_id, "step": step},
            ).start()
        if output is None:
            raise RuntimeError(f"{input_id}:{step}: gave up after {max_tries} tries")
    else:
        output = _local_step(step, text)
    close_old_connections()
    _insert(run=run, input_id=input_id, step=step, source=source, output=output)
    if position + 1 < len(steps):
        naive_enqueue(run=run, input_id=input_id, position=position + 1, text=text, steps=steps,
                      model_url=model_url, client_timeout=client_timeout, stall_seconds=stall_seconds)
    return step


def naive_enqueue(*, run: str, input_id: str, position: int, text: str, steps: list[str], model_url: str,
                  client_timeout: float, stall_seconds: float) -> None:
    """Queue one naive step task (also used by the chaos driver for duplicate enqueues)."""
    async_task(
        TASK, run, input_id, position, text, list(steps), model_url, client_timeout,
        stall_seconds=stall_seconds, task_name=f"naive:{input_id}:{position}",
    )
