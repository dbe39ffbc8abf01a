"""Plain-text renderings of chaos summaries (the command prints them; --json prints the dicts)."""
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
    ("outputs", "result rows"),
    ("duplicates", "DUPLICATES (extra result rows)"),
    ("lost", "LOST (not terminal / no output)"),
    ("elapsed_seconds", "elapsed seconds"),
]


def _faults_line(summary: dict) -> str:
    faults = summary.get("faults", {})
    parts = [f"{name}={value}" for name, value in faults.items() if name != "killed_tasks"]
    return ", ".join(parts) or "none"


def render(summaries: list[dict]) -> str:
    """One column per summary (guarded, naive), one row per measure."""
    heads = [f"{s['mode']} ({s['database']}+{s['broker']})" for s in summaries]
    width = max(len(label) for _, label in ROWS) + 2
    col = max(14, *(len(h) + 2 for h in heads))
    lines = ["".ljust(width) + "".join(h.rjust(col) for h in heads)]
    for key, label in ROWS:
        if all(key not in s for s in summaries):
            continue
        lines.append(label.ljust(width) + "".join(str(s.get(key, "-")).rjust(col) for s in summaries))
    for s in summaries:
        lines.append(f"{s['mode']} faults injected: {_faults_line(s)}")
        if s["mode"] == "guarded":
            lines.append(
                f"guarded steps by status: {s.get('steps_by_status')}; attempts by status: {s.get('attempts_by_status')}"
            )
            lines.append(
                f"late answers handed to their timed-out attempts: {s.get('faults', {}).get('late_writes_delivered', 0)}, "
                f"fenced {s.get('late_writes_fenced', 0)}, accepted {s.get('late_writes_accepted', 0)}"
            )
            integrity = s.get("integrity", {})
            lines.append(f"verify_integrity: {'clean' if integrity.get('ok') else 'VIOLATIONS'}")
            if s.get("timed_out"):
                lines.append("guarded run hit --timeout before every input was terminal")
    return "\n".join(lines)
