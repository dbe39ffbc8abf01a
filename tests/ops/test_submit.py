"""The ``submit`` command and the bulk submission service, on SQLite and PostgreSQL."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django_q.models import OrmQ

from pipeline_ops.models import PipelineInput, StepRun
from pipeline_ops.services.submissions import (
    LineError,
    inputs_submit_stream,
    submission_key_default,
    submission_lines_read,
)
from pipeline_ops.states import StepStatus

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def run_submit(*args, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """call_command with captured output; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        call_command("submit", *args, stdout=out, stderr=err)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    return status, out.getvalue(), err.getvalue()


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def test_submit_creates_inputs_steps_and_one_task_each_when_jsonl_is_new(tmp_path):
    path = write(tmp_path, "in.jsonl", jsonl({"text": f"text {i}"} for i in range(7)))

    status, out, _ = run_submit(path, "--batch-size", "3")

    assert status == 0
    assert "7 created, 0 already submitted" in out
    assert PipelineInput.objects.filter(submission_scope="cli").count() == 7
    assert StepRun.objects.count() == 7 * 3
    firsts = StepRun.objects.filter(position=0)
    assert set(firsts.values_list("status", flat=True)) == {StepStatus.QUEUED}
    assert StepRun.objects.filter(position__gt=0, status=StepStatus.PENDING).count() == 14
    queued_ids = sorted(q.task["args"][0] for q in OrmQ.objects.all())
    assert queued_ids == sorted(firsts.values_list("pk", flat=True))
    assert all(q.task["func"] == "pipeline_ops.tasks.step_run_execute_task" for q in OrmQ.objects.all())
    payloads = sorted(p["text"] for p in PipelineInput.objects.values_list("payload", flat=True))
    assert payloads == sorted(f"text {i}" for i in range(7))


def test_submit_creates_nothing_when_the_same_file_is_submitted_again(tmp_path):
    path = write(tmp_path, "in.jsonl", jsonl({"text": f"t{i}", "n": i} for i in range(25)))
    run_submit(path, "--batch-size", "10")
    tasks_before = OrmQ.objects.count()

    status, out, _ = run_submit(path, "--batch-size", "7", "--json")

    assert status == 0
    assert json.loads(out) == {
        "lines": 25, "created": 0, "already_submitted": 25, "errors": 0, "error_lines": [], "batches": 4,
    }
    assert PipelineInput.objects.count() == 25
    assert StepRun.objects.count() == 75
    assert OrmQ.objects.count() == tasks_before


def test_default_key_ignores_key_order_and_whitespace_when_payloads_are_equal(tmp_path):
    path = write(tmp_path, "in.jsonl", '{"text": "t", "b": "x"}\n{"b":"x","text":"t"}\n')

    status, out, _ = run_submit(path)

    assert status == 0
    assert "1 created, 1 already submitted" in out
    row = PipelineInput.objects.get()
    assert row.idempotency_key == submission_key_default(pipeline="default", payload={"text": "t", "b": "x"})


def test_same_payload_is_a_new_input_when_submitted_to_another_pipeline(tmp_path):
    path = write(tmp_path, "in.jsonl", '{"text": "same"}\n')
    run_submit(path)

    status, out, _ = run_submit(path, "--pipeline", "llm")

    assert status == 0 and "1 created" in out
    assert sorted(PipelineInput.objects.values_list("pipeline", flat=True)) == ["default", "llm"]


def test_submit_reads_csv_rows_as_payloads_when_file_is_csv(tmp_path):
    path = write(tmp_path, "in.csv", "id,text\nr1,first\nr2,\"second, with comma\"\n")

    status, out, _ = run_submit(path, "--key-column", "id")

    assert status == 0 and "2 created" in out
    rows = dict(PipelineInput.objects.values_list("idempotency_key", "payload"))
    assert rows == {"r1": {"id": "r1", "text": "first"}, "r2": {"id": "r2", "text": "second, with comma"}}


def test_key_column_decides_duplicates_when_payload_changed(tmp_path):
    run_submit(write(tmp_path, "a.jsonl", jsonl([{"id": 1, "text": "v1"}, {"id": 2, "text": "v1"}])), "--key-column", "id")

    status, out, _ = run_submit(write(tmp_path, "b.jsonl", jsonl([{"id": 1, "text": "v2"}, {"id": 3, "text": "v2"}])), "--key-column", "id")

    assert status == 0
    assert "1 created, 1 already submitted" in out
    assert PipelineInput.objects.get(idempotency_key="1").payload["text"] == "v1"
    assert sorted(PipelineInput.objects.values_list("idempotency_key", flat=True)) == ["1", "2", "3"]


def test_submit_reads_stdin_when_file_is_dash(monkeypatch):
    status, out, _ = run_submit("-", "--json", stdin=jsonl([{"text": "a"}, {"text": "b"}]), monkeypatch=monkeypatch)

    assert status == 0
    assert json.loads(out)["created"] == 2
    assert PipelineInput.objects.count() == 2


def test_bad_lines_are_reported_with_line_numbers_when_the_rest_is_good(tmp_path):
    text = (
        '{"text": "good 1"}\n'          # 1
        '{"text": broken\n'             # 2
        '\n'                            # 3 (blank: skipped)
        '[1, 2]\n'                      # 4
        '{"text": "good 2"}\n'          # 5
        '{"text": NaN}\n'               # 6
        '{"text": "x", "pipe": "nope"}\n'  # 7 (fine with the default pipeline)
    )
    path = write(tmp_path, "in.jsonl", text)

    status, out, err = run_submit(path, "--batch-size", "2", "--json")

    assert status == 2
    report = json.loads(out)
    assert report["created"] == 3 and report["errors"] == 3
    assert [e["line"] for e in report["error_lines"]] == [2, 4, 6]
    assert "bad JSON" in report["error_lines"][0]["message"]
    assert "not a JSON object" in report["error_lines"][1]["message"]
    assert PipelineInput.objects.count() == 3
    # Every created input is whole: its three steps and one queued task.
    assert StepRun.objects.count() == 9 and OrmQ.objects.count() == 3


def test_unknown_pipeline_in_a_line_is_a_bad_line_when_pipeline_column_is_used(tmp_path):
    path = write(tmp_path, "in.jsonl", jsonl([
        {"pipe": "default", "text": "a"}, {"pipe": "nope", "text": "b"}, {"text": "c"}, {"pipe": "llm", "text": "d"},
    ]))

    status, out, err = run_submit(path, "--pipeline-column", "pipe")

    assert status == 2
    assert "line 2: unknown pipeline 'nope'" in err
    assert "line 3: no pipeline in column 'pipe'" in err
    assert "2 created" in out
    assert sorted(PipelineInput.objects.values_list("pipeline", flat=True)) == ["default", "llm"]
    assert all("pipe" not in p for p in PipelineInput.objects.values_list("payload", flat=True))


def test_csv_rows_with_wrong_column_count_are_bad_lines_when_others_are_fine(tmp_path):
    path = write(tmp_path, "in.csv", "id,text\n1,a\n2,b,extra\n\n3\n4,d\n,e\n")

    status, out, err = run_submit(path, "--key-column", "id")

    assert status == 2
    assert "line 3: expected 2 columns, got 3" in err
    assert "line 5: expected 2 columns, got 1" in err
    assert "line 7: no idempotency key in column 'id'" in err
    assert sorted(PipelineInput.objects.values_list("idempotency_key", flat=True)) == ["1", "4"]


def test_repeated_key_within_one_batch_creates_one_input_when_file_repeats_a_line(tmp_path):
    path = write(tmp_path, "in.jsonl", jsonl([{"id": "k", "text": "one"}, {"id": "k", "text": "two"}, {"id": "j", "text": "three"}]))

    status, out, _ = run_submit(path, "--key-column", "id", "--json")

    assert json.loads(out)["created"] == 2 and json.loads(out)["already_submitted"] == 1
    assert PipelineInput.objects.get(idempotency_key="k").payload["text"] == "one"


def test_scopes_keep_keys_apart_when_two_scopes_use_the_same_key(tmp_path):
    path = write(tmp_path, "in.jsonl", jsonl([{"id": "k", "text": "one"}]))
    run_submit(path, "--key-column", "id", "--scope", "team-a")

    status, out, _ = run_submit(path, "--key-column", "id", "--scope", "team-b")

    assert "1 created" in out
    assert sorted(PipelineInput.objects.values_list("submission_scope", flat=True)) == ["team-a", "team-b"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pipeline", "nope"], "Unknown pipeline 'nope'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--scope", " "], "--scope must not be empty"),
        (["--key-column", "missing", "--format", "csv"], "--key-column 'missing' is not a column"),
    ],
)
def test_submit_raises_command_error_and_creates_nothing_when_arguments_are_bad(tmp_path, args, message):
    path = write(tmp_path, "in.txt", "id,text\n1,a\n")

    with pytest.raises(CommandError, match=message):
        call_command("submit", path, *args, stdout=io.StringIO(), stderr=io.StringIO())
    assert PipelineInput.objects.count() == 0


def test_submit_raises_command_error_when_file_is_missing(tmp_path):
    with pytest.raises(CommandError, match="Cannot read"):
        call_command("submit", str(tmp_path / "absent.jsonl"))


def test_lines_reader_numbers_every_physical_line_when_csv_fields_span_lines():
    stream = io.StringIO('id,text\n1,"two\nlines"\n2,ok\n3,"x",y\n', newline="")

    items = list(submission_lines_read(stream=stream, fmt="csv", key_column="id"))

    assert [getattr(i, "line") for i in items] == [3, 4, 5]
    assert isinstance(items[2], LineError)
    assert items[0].payload == {"id": "1", "text": "two\nlines"}


def test_service_reports_progress_per_batch_when_given_a_callback():
    seen = []
    report = inputs_submit_stream(
        stream=io.StringIO(jsonl({"text": f"n{i}"} for i in range(5))), fmt="jsonl", batch_size=2, progress=seen.append,
    )
    assert report.created == 5 and sum(seen) == 5 and len(seen) == 3


def test_command_exits_non_zero_with_one_line_when_run_from_the_shell(tmp_path):
    env = {**os.environ, "DEBUG": "1"}
    result = subprocess.run(
        [sys.executable, "manage.py", "submit", str(tmp_path / "x.jsonl"), "--batch-size", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "CommandError: --batch-size must be at least 1."
    help_ = subprocess.run(
        [sys.executable, "manage.py", "submit", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert help_.returncode == 0 and "--key-column" in help_.stdout


@pytest.mark.parametrize("pipeline", ["default", "llm"])
def test_bulk_step_runs_equal_the_single_submission_ones_when_pipeline_is_the_same(pipeline):
    """The set-based step insert creates exactly what input_submit creates row by row."""
    from pipeline_ops.services.inputs import input_submit

    single = input_submit(pipeline=pipeline, payload={"text": "one"}, scope="api:1", key="k").input
    bulk = inputs_submit_stream(stream=io.StringIO('{"text": "two"}\n'), fmt="jsonl", pipeline=pipeline)
    assert bulk.created == 1
    bulk_input = PipelineInput.objects.get(submission_scope="cli")

    def shape(pipeline_input):
        rows = []
        for row in StepRun.objects.filter(input=pipeline_input).order_by("position").values():
            assert row["created_at"] is not None and row["updated_at"] is not None
            row["enqueued_at"] = row["enqueued_at"] is not None
            for name in ("id", "input_id", "created_at", "updated_at"):
                row.pop(name)
            rows.append(row)
        return rows

    assert shape(bulk_input) == shape(single)
    assert len(shape(single)) == 3
    assert bulk_input.status == single.status and bulk_input.finished_at is None


# --- one validator for the API and the command (issue 13, item 2) ---------------------------------

REFUSED_PAYLOADS = [
    ({"id": "no-text", "body": "hello"}, "text_required"),
    ({"text": "   "}, "text_required"),
    ({"text": 5}, "text_required"),
    ({"text": "x", "deep": [[[[[[[[[1]]]]]]]]]}, "too_deep"),
    ({"text": "nul \u0000 here"}, "null_character"),
]


@pytest.mark.parametrize("payload,code", REFUSED_PAYLOADS)
def test_submit_refuses_a_line_with_the_apis_code_when_the_api_refuses_the_same_payload(tmp_path, payload, code):
    from rest_framework.test import APIClient

    from tests.admin.helpers import operator

    client = APIClient()
    client.force_authenticate(operator("api-client"))
    answer = client.post("/api/v1/inputs/", {"pipeline": "default", "payload": payload}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert answer.status_code == 400
    assert [e["code"] for e in answer.json()["errors"]] == [code]

    status, out, err = run_submit(write(tmp_path, "in.jsonl", jsonl([payload, {"text": "fine"}])), "--json")

    assert status == 2
    report = json.loads(out)
    assert report["created"] == 1 and report["errors"] == 1
    assert report["error_lines"][0]["line"] == 1 and f"({code})" in report["error_lines"][0]["message"]
    assert PipelineInput.objects.count() == 1


def test_submit_refuses_every_row_when_the_csv_has_no_text_column(tmp_path):
    status, out, err = run_submit(write(tmp_path, "in.csv", "id,body\n1,hello\n2,world\n"))

    assert status == 2
    assert "0 created" in out and "2 bad lines" in out
    assert "line 2: The payload needs a non-empty 'text' string. (text_required)" in err
    assert PipelineInput.objects.count() == 0


def test_submit_fails_with_one_line_and_submits_nothing_when_the_file_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5))
    path.write_bytes(good.encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"))

    with pytest.raises(CommandError, match=r"is not UTF-8 text \(invalid continuation byte at byte \d+, line 6\); nothing was submitted\."):
        call_command("submit", str(path), stdout=io.StringIO(), stderr=io.StringIO())
    assert PipelineInput.objects.count() == 0 and OrmQ.objects.count() == 0


def test_submit_from_stdin_submits_nothing_when_a_late_byte_is_not_utf8(monkeypatch):
    raw = io.BytesIO(("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(3))).encode() + b'{"text": "\xff"}\n')
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw))

    with pytest.raises(CommandError, match="standard input is not UTF-8 text"):
        call_command("submit", "-", stdout=io.StringIO(), stderr=io.StringIO())
    assert PipelineInput.objects.count() == 0


def test_command_prints_one_line_and_no_traceback_when_run_from_the_shell_on_a_non_utf8_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text\n\xff\xfe\n")
    result = subprocess.run(
        [sys.executable, "manage.py", "submit", str(path)],
        cwd=ROOT, env={**os.environ, "DEBUG": "1"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"CommandError: {path} is not UTF-8 text (invalid start byte at byte 5, line 2); nothing was submitted."]
