"""An input's step timeline: every step, every attempt, drawn as a server-side SVG (no JS)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Q
from django.utils import timezone

from idempotency.models import Attempt, IdempotencyRecord

from ..models import OperatorAction, PipelineInput, StepOutput, StepRun
from ..services.operations import step_run_records

STATUS_COLOURS = {
    "SUCCEEDED": "#2e7d32",
    "FAILED": "#c62828",
    "UNKNOWN": "#8e24aa",
    "TIMED_OUT": "#ef6c00",
    "FENCED": "#f9a825",
    "RUNNING": "#1565c0",
}
# Numbers a step may report about itself in Attempt.details, shown first and labelled.
DETAIL_LABELS = {
    "latency_ms": "latency (ms)",
    "tokens": "tokens",
    "total_tokens": "tokens",
    "prompt_tokens": "prompt tokens",
    "completion_tokens": "completion tokens",
    "provider_request_id": "provider request",
    "model": "model",
}

CHART_WIDTH = 900
LABEL_WIDTH = 130
ROW_HEIGHT = 28


@dataclass
class AttemptRow:
    attempt: Attempt
    duration: str
    details: list[tuple[str, str]]
    colour: str
    started: str = ""
    finished: str = ""


@dataclass
class StepRow:
    step_run: StepRun
    record: IdempotencyRecord | None
    output: StepOutput | None
    attempts: list[AttemptRow] = field(default_factory=list)
    output_json: str = ""


@dataclass
class Bar:
    x: float
    y: float
    width: float
    colour: str
    title: str
    label: str


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "running"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _when(value: datetime | None) -> str:
    """Date, time to the millisecond and time zone: attempts are compared with logs."""
    if value is None:
        return ""
    local = timezone.localtime(value)
    return f"{local:%Y-%m-%d %H:%M:%S}.{local.microsecond // 1000:03d} {local:%Z}"


def _details(details: dict) -> list[tuple[str, str]]:
    shown = [(DETAIL_LABELS[k], str(v)) for k, v in details.items() if k in DETAIL_LABELS]
    shown += [(k, str(v)[:120]) for k, v in details.items() if k not in DETAIL_LABELS]
    return shown


def input_timeline(*, pipeline_input: PipelineInput, now: datetime | None = None) -> dict:
    """Steps with their records, outputs, every attempt and the operator actions on them (five
    queries), plus SVG bars."""
    now = now or timezone.now()
    steps = list(StepRun.objects.filter(input=pipeline_input).select_related("input").order_by("position"))
    records = step_run_records(step_runs=steps)
    record_ids = [r.pk for r in records.values()]
    attempts_by_record: dict[int, list[Attempt]] = {}
    for attempt in Attempt.objects.filter(record_id__in=record_ids).order_by("record_id", "number"):
        attempts_by_record.setdefault(attempt.record_id, []).append(attempt)
    outputs = {o.step_run_id: o for o in StepOutput.objects.filter(input=pipeline_input)}

    rows: list[StepRow] = []
    for step_run in steps:
        record = records.get(step_run.pk)
        output = outputs.get(step_run.pk)
        row = StepRow(step_run=step_run, record=record, output=output,
                      output_json=json.dumps(output.output, ensure_ascii=False, indent=2, sort_keys=True, default=str) if output else "")
        for attempt in attempts_by_record.get(record.pk, []) if record else []:
            row.attempts.append(
                AttemptRow(
                    attempt=attempt,
                    duration=_fmt_duration(attempt.duration_seconds),
                    details=_details(attempt.details or {}),
                    colour=STATUS_COLOURS.get(attempt.status, "#757575"),
                    started=_when(attempt.started_at),
                    finished=_when(attempt.finished_at),
                )
            )
        rows.append(row)

    all_attempts = [a.attempt for row in rows for a in row.attempts]
    start = min([pipeline_input.created_at, *[a.started_at for a in all_attempts]])
    end = max([pipeline_input.finished_at or now, *[(a.finished_at or now) for a in all_attempts]])
    span = max((end - start).total_seconds(), 0.001)
    scale = (CHART_WIDTH - LABEL_WIDTH - 20) / span
    bars = []
    for index, row in enumerate(rows):
        for a in row.attempts:
            x = LABEL_WIDTH + (a.attempt.started_at - start).total_seconds() * scale
            width = max(((a.attempt.finished_at or now) - a.attempt.started_at).total_seconds() * scale, 4)
            bars.append(
                Bar(
                    x=round(x, 1), y=index * ROW_HEIGHT + 20, width=round(width, 1), colour=a.colour,
                    title=f"{row.step_run.step} attempt #{a.attempt.number}: {a.attempt.status}, {a.duration}, worker {a.attempt.worker or '?'}",
                    label=f"#{a.attempt.number}" if width >= 22 else "",  # no label where it would not fit
                )
            )
    # The operators' hands on this input: its own actions and those on its steps (one query).
    actions = list(
        OperatorAction.objects.filter(
            Q(target_type="input", target_id=str(pipeline_input.pk))
            | Q(target_type="step_run", target_id__in=[str(s.pk) for s in steps])
        ).order_by("-created_at")[:50]
    )
    return {
        "actions": actions,
        "rows": rows,
        "bars": bars,
        "chart": {
            "width": CHART_WIDTH,
            "height": len(rows) * ROW_HEIGHT + 40,
            "label_width": LABEL_WIDTH,
            "row_height": ROW_HEIGHT,
            "span": _fmt_duration(span),
            "start": start,
            "end": end,
            "labels": [(row.step_run.step, index * ROW_HEIGHT + 20 + 14) for index, row in enumerate(rows)],
            "axis_y": len(rows) * ROW_HEIGHT + 24,
        },
        "legend": list(STATUS_COLOURS.items()),
        "attempt_count": len(all_attempts),
    }
