"""The chaos run's counters: the effects log (``pipeline_ops.chaos.effects``), the classification of
stored errors for "failed by infrastructure", and the report's closing lines.

The effects log exists because the old duplicates figure (output rows minus distinct (input,
step)) could never be non-zero: StepOutput is unique on that pair. These tests prove the new
counter *can* fail, that concurrent processes cannot corrupt it, and that the control group stores
its results through the very same function, so one counter measures both runs.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import uuid

import pytest
from django.conf import settings

from idempotency.faults import is_infrastructure_error_type
from pipeline_ops.chaos import effects, naive
from pipeline_ops.chaos.effects import (
    EFFECTS_LOG_ENV, calls_count, deliveries_count, effect_append, effects_connect, effects_count, effects_read,
)
from pipeline_ops.chaos.report import final_lines, render
from pipeline_ops.signals import step_effect_committed


def test_duplicates_non_zero_when_a_key_has_two_effects(tmp_path):
    log = tmp_path / "effects.jsonl"
    effect_append(key="1:preprocess", source="guarded", attempt=1, path=log)
    effect_append(key="1:llm", source="guarded", attempt=1, path=log)
    effect_append(key="1:llm", source="late", attempt=2, path=log)  # a second effect of the same step
    counted = effects_count(effects_read(log), keys=["1:preprocess", "1:sentiment", "1:llm"])
    assert counted["duplicates"] == 1
    assert counted["max"] == 2
    assert counted["total"] == 3
    # 1:sentiment had no effect, 1:preprocess one, 1:llm two.
    assert counted["distribution"] == {"0": 1, "1": 1, "2": 1}
    assert counted["keys_with_more_than_one_effects"] == ["1:llm"]


def test_duplicates_sum_effects_beyond_one_per_key_when_several_keys_repeat(tmp_path):
    log = tmp_path / "effects.jsonl"
    for key, times in {"a": 3, "b": 2, "c": 1}.items():
        for _ in range(times):
            effect_append(key=key, source="naive-first", path=log)
    effect_append(key="other-run", source="naive-first", path=log)  # not one of this run's keys
    counted = effects_count(effects_read(log), keys=["a", "b", "c", "d"])
    assert counted["duplicates"] == (3 - 1) + (2 - 1)
    assert counted["distribution"] == {"0": 1, "1": 1, "2": 1, "3": 1}


def test_deliveries_and_effects_kept_apart_when_one_log_holds_both(tmp_path):
    log = tmp_path / "effects.jsonl"
    effect_append(key="step_run:1", source="worker", kind=effects.DELIVERY, path=log)
    effect_append(key="step_run:1", source="worker", kind=effects.DELIVERY, path=log)
    effect_append(key="5:llm", source="guarded", path=log)
    lines = effects_read(log)
    assert deliveries_count(lines, tasks=["step_run:1", "step_run:2"])["per_step"] == 1.0
    assert effects_count(lines, keys=["5:llm", "step_run:1"])["total"] == 1


def test_model_calls_spread_per_key_when_a_key_was_retried():
    spread = calls_count({"1:llm": 3, "2:llm": 1, "9:llm": 7}, keys=["1:llm", "2:llm", "3:llm"])
    assert spread["distribution"] == {"0": 1, "1": 1, "3": 1}
    assert spread["max"] == 3 and spread["duplicates"] == 2


def _append_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        effect_append(key=f"{worker}:{i}", source="x" * 200, path=path)  # long lines: more room to tear


def test_lines_never_interleave_when_processes_append_at_once(tmp_path):
    log = tmp_path / "effects.jsonl"
    processes = [multiprocessing.Process(target=_append_many, args=(str(log), w, 400)) for w in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    raw = log.read_text().splitlines()
    assert len(raw) == 6 * 400
    parsed = [json.loads(line) for line in raw]  # every line whole: none torn or merged
    assert len({(p["key"]) for p in parsed}) == 6 * 400


def test_nothing_connected_or_written_when_the_log_is_unset(monkeypatch, tmp_path):
    monkeypatch.delenv(EFFECTS_LOG_ENV, raising=False)
    assert effect_append(key="1:llm", source="guarded") is False
    assert effects_connect() is False
    assert list(tmp_path.iterdir()) == []


def test_signal_appends_one_line_when_an_attempt_completed_a_step(monkeypatch, tmp_path):
    log = tmp_path / "effects.jsonl"
    monkeypatch.setenv(EFFECTS_LOG_ENV, str(log))
    assert effects_connect() is True
    try:
        step_effect_committed.send(sender=None, step_run_id=7, input_id=3, step="llm", key="3:llm",
                                   attempt_number=2, worker="host:1")
    finally:
        step_effect_committed.disconnect(dispatch_uid="chaos-effects-log")
    (line,) = effects_read(log)
    assert line["key"] == "3:llm" and line["attempt"] == 2 and line["kind"] == "effect"


@pytest.mark.django_db
def test_naive_results_counted_by_the_same_counter_when_stored_twice(monkeypatch, tmp_path):
    # The control group's storing function appends to the effects log: its duplicates are the
    # effects counter's, and they agree with its own table (no unique constraint either).
    log = tmp_path / "effects.jsonl"
    monkeypatch.setenv(EFFECTS_LOG_ENV, str(log))
    run, input_id = uuid.uuid4().hex[:10], str(uuid.uuid4())
    naive.naive_table_reset()
    try:
        naive._insert(run=run, input_id=input_id, step="llm", source="first", output="a")
        naive._insert(run=run, input_id=input_id, step="llm", source="late", output="a")
        naive._insert(run=run, input_id=input_id, step="preprocess", source="first", output="b")
        table = naive.naive_counts(run=run)
    finally:
        naive.naive_table_drop()
    counted = effects_count(effects_read(log), keys=[f"{input_id}:{s}" for s in ("preprocess", "sentiment", "llm")])
    assert counted["duplicates"] == table["duplicates"] == 1
    assert counted["total"] == table["rows"] == 3


@pytest.mark.parametrize(("error_type", "message", "vendor", "expected"), [
    ("OperationalError", "terminating connection due to administrator command", "postgresql", True),
    ("InterfaceError", "connection already closed", "postgresql", True),
    ("LockNotAvailable", "canceling statement due to lock timeout", "postgresql", True),
    ("AdminShutdown", "terminating connection due to administrator command", "postgresql", True),
    ("IntegrityError", "duplicate key value violates unique constraint", "postgresql", False),
    ("DataError", "unsupported Unicode escape sequence", "postgresql", False),
    ("HTTPStatusError", "Server error '500 Internal Server Error'", "postgresql", False),
    ("LeaseExpired", "lease expired; superseded", "postgresql", False),
    ("OperationalError", "database is locked", "sqlite", True),
    ("OperationalError", "no such table: pipeline_ops_steprun", "sqlite", False),
])
def test_stored_error_classified_like_the_exception_when_only_its_type_and_message_are_known(
    error_type, message, vendor, expected,
):
    assert is_infrastructure_error_type(error_type, message, vendor=vendor) is expected


def test_report_ends_with_the_four_lines_when_rendered():
    summary = {
        "mode": "guarded", "database": "postgresql", "broker": "orm", "duplicates": 2, "lost": 1,
        "failed_by_infrastructure": 3, "effects_max": 2, "queue_messages_left": 0, "deliveries_per_step": 1.2,
        "effects": {"distribution": {"1": 9, "2": 2}}, "integrity": {"ok": True},
        "queue": {"peak": 14, "queued_steps_at_peak": 9, "worst_ratio": 1.56},
    }
    text = render([summary])
    assert text.splitlines()[-4:] == final_lines(summary) == [
        "duplicates: 2", "lost: 1", "failed by infrastructure: 3", "effects per key: max 2",
    ]
    assert "queue messages left: 0" in text and "deliveries per step: 1.2" in text
    assert "queue peak: 14 messages (9 steps QUEUED then); worst queue/QUEUED: 1.56" in text


def test_db_faults_refused_in_one_line_when_the_database_is_sqlite(tmp_path):
    # A real `manage.py chaos` process on a SQLite database: it must refuse before starting anything.
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'chaos.sqlite3'}", "DEBUG": "1"}
    result = subprocess.run(
        [sys.executable, "manage.py", "chaos", "--db-faults", "--inputs", "1"],
        cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "CommandError: --db-faults needs PostgreSQL (it terminates backends); this database is sqlite."
    ]
