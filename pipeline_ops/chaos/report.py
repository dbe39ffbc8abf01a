"""Plain-text renderings of chaos summaries (the command prints them; --json prints the dicts).

The text report ends with four lines that scripts and people read, for the first run shown (the
guarded one; the control group's with ``--naive-only``)::

    duplicates: N
    lost: N
    failed by infrastructure: N
    effects per key: max N
"""
from __future__ import annotations

ROWS = [
    ("inputs", "inputs"),
    ("steps", "steps"),
    ("attempts", "attempts started"),
    ("retries", "retries"),
    ("unknown_outcomes", "unknown outcomes (client timeouts)"),
    ("fenced", "fenced late writes"),
    ("late_rows", "late writes stored"),
    ("model_calls", "model calls received"),
    ("model_keys", "distinct idempotency keys"),
    ("model_calls_beyond_one_per_key", "model calls beyond one per key"),
    ("effects_total", "effects logged (no unique constraint)"),
    ("effects_max", "effects per key: max"),
    ("duplicates", "DUPLICATES (effects beyond one per key)"),
    ("outputs", "result rows"),
    ("output_rows_beyond_one_per_step", "result rows beyond one per step (table)"),
    ("lost", "LOST (not terminal / no output)"),
    ("failed_by_infrastructure", "failed by infrastructure"),
    ("elapsed_seconds", "elapsed seconds"),
]


def _faults_line(summary: dict) -> str:
    faults = summary.get("faults", {})
    parts = [f"{name}={value}" for name, value in faults.items() if name not in ("killed_tasks", "terminator_errors")]
    return ", ".join(parts) or "none"


def _cell(summary: dict, key: str) -> str:
    value = summary.get(key, "-")
    return "-" if value is None else str(value)


def _distribution(spread: dict | None) -> str:
    if not spread:
        return "-"
    return ", ".join(f"{n}: {keys}" for n, keys in spread["distribution"].items())


def final_lines(summary: dict) -> list[str]:
    """The four closing lines (exact wording: scripts parse them)."""
    return [
        f"duplicates: {summary['duplicates']}",
        f"lost: {summary['lost']}",
        f"failed by infrastructure: {summary.get('failed_by_infrastructure') or 0}",
        f"effects per key: max {summary['effects_max']}",
    ]


def render(summaries: list[dict]) -> str:
    """One column per summary (guarded, naive), one row per measure, then the closing lines."""
    heads = [f"{s['mode']} ({s['database']}+{s['broker']})" for s in summaries]
    width = max(len(label) for _, label in ROWS) + 2
    col = max(14, *(len(h) + 2 for h in heads))
    lines = ["".ljust(width) + "".join(h.rjust(col) for h in heads)]
    for key, label in ROWS:
        if all(key not in s for s in summaries):
            continue
        lines.append(label.ljust(width) + "".join(_cell(s, key).rjust(col) for s in summaries))
    for s in summaries:
        mode = s["mode"]
        lines.append(f"{mode} faults injected: {_faults_line(s)}")
        lines.append(f"{mode} effects per key (effects: keys): {_distribution(s.get('effects'))}")
        lines.append(f"{mode} model calls per llm key, from the model server (calls: keys): "
                     f"{_distribution(s.get('model_calls_per_key'))}")
        if mode == "guarded":
            lines.append(
                f"guarded steps by status: {s.get('steps_by_status')}; attempts by status: {s.get('attempts_by_status')}"
            )
            if s.get("failed_steps_by_last_error"):
                lines.append(f"guarded failed steps by last error: {s['failed_steps_by_last_error']}")
            lines.append(
                f"late answers handed to their timed-out attempts: {s.get('faults', {}).get('late_writes_delivered', 0)}, "
                f"fenced {s.get('late_writes_fenced', 0)}, accepted {s.get('late_writes_accepted', 0)}"
            )
            integrity = s.get("integrity", {})
            lines.append(f"verify_integrity: {'clean' if integrity.get('ok') else 'VIOLATIONS'}")
            if s.get("timed_out"):
                lines.append("guarded run hit --timeout before every input was terminal")
    first = summaries[0]
    lines.append(f"queue messages left: {_cell(first, 'queue_messages_left')}")
    lines.append(f"deliveries per step: {first.get('deliveries_per_step', '-')}")
    if "deliveries_per_step_beyond_the_scenario" in first:
        lines.append("deliveries per step beyond the scenario's duplicate enqueues and retries: "
                     f"{first['deliveries_per_step_beyond_the_scenario']}")
    queue = first.get("queue") or {}
    if queue:
        lines.append(f"queue peak: {queue['peak']} messages ({queue['queued_steps_at_peak']} steps QUEUED then); "
                     f"worst queue/QUEUED: {queue['worst_ratio']}")
    lines.extend(final_lines(first))
    return "\n".join(lines)
