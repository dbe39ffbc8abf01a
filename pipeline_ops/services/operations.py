"""Operators' services: safe retry, forced retry, cancel and lease release, each audited.

The admin, the API and the command line call these functions and nothing else; they check
permissions themselves (a forced retry needs ``force_retry_steprun``) and pass ``force`` as given.

Shape of every action (Django's ``delete_selected``, made safe for a queue):

* a *plan* (``*_plan``) says, per target, what will happen and why not: the confirmation page
  and ``--dry-run`` show it, nothing is written;
* the action re-decides every target under a row lock, inside its own transaction, from the state
  it finds *then* (the plan may be stale by the time the operator clicks), makes each move with a
  conditional UPDATE, and writes the ``OperatorAction`` audit row in that same transaction: the
  change and its record commit together or not at all;
* the result is an ``ActionReport`` with counts and one human message
  ("3 queued, 1 skipped: already completed by attempt #2").

One transaction per target, not per batch: a batch of 10,000 must not hold SQLite's single
writer lock (or 10,000 PostgreSQL row locks) for its whole run, and one target's race must not
roll back the others.
"""
from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from idempotency import guard
from idempotency.clock import db_now
from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import RecordStatus

from ..models import OperatorAction, PipelineInput, StepRun
from ..queueing import step_run_enqueue
from ..states import InputStatus, StepStatus, step_sources
from .steps import input_rows_lock, step_rows_lock

# The guard scope the runner claims step keys in (key: "<input id>:<step>", see StepRun.idempotency_key).
STEP_SCOPE = "step"

# Message templates (tests assert these; keep them stable).
MSG_COMPLETED = "already completed by attempt #{number}"
MSG_COMPLETED_NO_ATTEMPT = "already completed"
MSG_RUNNING = "running on worker {worker} until {until}"
MSG_CANCELLED = "cancelled"
MSG_NOT_STARTED = "not started yet (waiting for earlier steps)"
MSG_QUEUED = "already queued"
MSG_NO_LEASE = "holds no lease ({status})"
MSG_INPUT_TERMINAL = "already {status}"
MSG_CHANGED = "changed while the action ran: {reason}"
MSG_DISCARDED = "discarded by an operator (services.discard): never retried"

# Short keys the counts are grouped by (reports, metrics, tests).
KIND_FAILED = "failed"
KIND_WAITING = "waiting"
KIND_STUCK = "stuck"
KIND_FORCED = "forced"
KIND_ACTIVE = "active"
KIND_COMPLETED = "completed"
KIND_RUNNING = "running"
KIND_CANCELLED = "cancelled"
KIND_NOT_STARTED = "not_started"
KIND_QUEUED = "queued"
KIND_NO_LEASE = "no_lease"
KIND_TERMINAL = "terminal"

_KIND_PLURAL = {
    KIND_COMPLETED: "already completed",
    KIND_RUNNING: "running (a forced retry would fence them)",
    KIND_CANCELLED: "cancelled",
    KIND_NOT_STARTED: "not started yet",
    KIND_QUEUED: "already queued",
    KIND_NO_LEASE: "hold no lease",
    KIND_TERMINAL: "already finished",
    "discarded": "discarded",
    "not_dead": "not dead",
    "key_open": "being retried",
}


@dataclass(frozen=True)
class Decision:
    """What an action will do (``acts``) or why it will not (``reason``) for one target."""

    target: Any
    target_type: str
    acts: bool
    kind: str
    reason: str
    # For step runs: the guard's record as it was when decided (None if never claimed).
    record: IdempotencyRecord | None = None

    @property
    def target_id(self) -> str:
        return str(self.target.pk)

    @property
    def label(self) -> str:
        return str(self.target)


@dataclass
class ActionReport:
    """The outcome of one operator request: counts and one message for a human."""

    action: str
    verb: str
    batch: uuid.UUID
    done: int = 0
    skipped: Counter = field(default_factory=Counter)
    decisions: list[Decision] = field(default_factory=list)
    spread_seconds: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def message(self) -> str:
        text = f"{self.done} {self.verb}"
        if self.spread_seconds >= 1:
            text += f" (spread over {self.spread_seconds:.0f} s)"
        elif self.spread_seconds > 0:  # two or three steps at 5/s: "0.4 s", not "0 s"
            text += f" (spread over {self.spread_seconds:.1f} s)"
        skips = [d for d in self.decisions if not d.acts]
        if not skips:
            return text
        if len(skips) == 1:
            return f"{text}, 1 skipped: {skips[0].reason}"
        parts = []
        for kind, count in self.skipped.most_common():
            if count == 1:
                parts.append(next(d.reason for d in skips if d.kind == kind))
            else:
                parts.append(f"{count} {_KIND_PLURAL.get(kind, kind)}")
        return f"{text}, {len(skips)} skipped: " + "; ".join(parts)

    def add(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if decision.acts:
            self.done += 1
        else:
            self.skipped[decision.kind] += 1


# --- reading the state of step runs ------------------------------------------------------------


def _pks(objects: Iterable) -> list:
    """Ids of instances, ids or a queryset (a queryset's ids in one narrow query, without its
    annotations or related rows)."""
    if isinstance(objects, QuerySet):
        return list(objects.values_list("pk", flat=True))
    return [getattr(obj, "pk", obj) for obj in objects]


def _step_runs_load(step_runs: Iterable[StepRun], *, for_update: bool = False) -> list[StepRun]:
    query = StepRun.objects.filter(pk__in=_pks(step_runs)).select_related("input", "idempotency_record")
    if for_update:
        query = query.select_for_update(of=("self",))
    return list(query.order_by("input__created_at", "input_id", "position"))


def step_run_records(*, step_runs: list[StepRun], for_update: bool = False) -> dict[int, IdempotencyRecord]:
    """The guard's record of each step run, by step run id (one query).

    The runner links ``StepRun.idempotency_record``; steps claimed before it did are found by
    their key in the step scope."""
    by_step: dict[int, IdempotencyRecord] = {}
    missing: dict[str, int] = {}
    linked_ids = {}
    for step_run in step_runs:
        if step_run.idempotency_record_id:
            linked_ids[step_run.idempotency_record_id] = step_run.pk
        else:
            missing[step_run.idempotency_key] = step_run.pk
    if not linked_ids and not missing:
        return by_step
    query = IdempotencyRecord.objects.filter(Q(pk__in=list(linked_ids)) | Q(scope=STEP_SCOPE, key__in=list(missing)))
    if for_update:
        query = query.select_for_update()
    for record in query:
        if record.pk in linked_ids:
            by_step[linked_ids[record.pk]] = record
        elif record.key in missing:
            by_step[missing[record.key]] = record
    return by_step


def _holders(records: Iterable[IdempotencyRecord]) -> dict[int, Attempt]:
    """The attempt currently holding each PROCESSING record (one query)."""
    processing = [r for r in records if r is not None and r.status == RecordStatus.PROCESSING]
    if not processing:
        return {}
    wanted = {(r.pk, r.attempt_count) for r in processing}
    attempts = Attempt.objects.filter(record_id__in=[r.pk for r in processing], number__in={n for _, n in wanted})
    return {a.record_id: a for a in attempts.only("record_id", "number", "worker", "status") if (a.record_id, a.number) in wanted}


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "?"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S")


def _running_reason(record: IdempotencyRecord, holder: Attempt | None) -> str:
    return MSG_RUNNING.format(worker=(holder.worker if holder and holder.worker else "?"), until=_fmt_time(record.lease_expires_at))


def _decide_retry(step_run: StepRun, record: IdempotencyRecord | None, holder: Attempt | None, *, force: bool, now: datetime) -> Decision:
    def decision(acts: bool, kind: str, reason: str) -> Decision:
        return Decision(target=step_run, target_type="step_run", acts=acts, kind=kind, reason=reason, record=record)

    if step_run.status == StepStatus.CANCELLED or step_run.input.status == InputStatus.CANCELLED:
        return decision(False, KIND_CANCELLED, MSG_CANCELLED)
    if step_run.status == StepStatus.DISCARDED:
        return decision(False, "discarded", MSG_DISCARDED)
    if (record is not None and record.status == RecordStatus.COMPLETED) or step_run.status == StepStatus.SUCCEEDED:
        if record is not None and record.status == RecordStatus.COMPLETED:
            # Only the holder may complete a key, so the winner is attempt number attempt_count.
            return decision(False, KIND_COMPLETED, MSG_COMPLETED.format(number=record.attempt_count))
        return decision(False, KIND_COMPLETED, MSG_COMPLETED_NO_ATTEMPT)
    if record is not None and record.status == RecordStatus.PROCESSING:
        running = _running_reason(record, holder)
        if record.lease_expires_at is not None and record.lease_expires_at > now:
            if force:
                return decision(True, KIND_FORCED, f"{running}: its attempt will be fenced")
            return decision(False, KIND_RUNNING, running)
        return decision(True, KIND_STUCK, f"lease expired at {_fmt_time(record.lease_expires_at)} (worker {holder.worker if holder else '?'}): released and retried")
    if step_run.status == StepStatus.PENDING:
        return decision(False, KIND_NOT_STARTED, MSG_NOT_STARTED)
    if step_run.status == StepStatus.QUEUED and (record is None or record.retry_at is not None):
        return decision(False, KIND_QUEUED, f"{MSG_QUEUED} at {_fmt_time(step_run.enqueued_at)}")
    if step_run.status == StepStatus.RETRY_WAIT or (record is not None and record.retry_at is not None):
        due = step_run.next_attempt_at or (record.retry_at if record else None)
        return decision(True, KIND_WAITING, f"waiting to retry at {_fmt_time(due)}: retried now")
    error = step_run.last_error or (record.error_summary if record else "") or "no error recorded"
    return decision(True, KIND_FAILED, f"failed after {step_run.attempts_used} attempt(s): {error[:200]}")


def _step_snapshot(step_run: StepRun, record: IdempotencyRecord | None) -> dict[str, Any]:
    return {
        "step_status": step_run.status,
        "input_status": step_run.input.status,
        "attempts_used": step_run.attempts_used,
        "next_attempt_at": step_run.next_attempt_at.isoformat() if step_run.next_attempt_at else None,
        "record_status": record.status if record else None,
        "attempt_count": record.attempt_count if record else None,
        "lease_expires_at": record.lease_expires_at.isoformat() if record and record.lease_expires_at else None,
        "retry_at": record.retry_at.isoformat() if record and record.retry_at else None,
    }


def _actor_name(actor) -> str:
    return (getattr(actor, "get_username", lambda: "")() or "")[:150] if actor is not None else ""


def _audit(*, batch, actor, source, action, reason, decision: Decision, before, after, outcome) -> OperatorAction:
    return OperatorAction.objects.create(
        batch=batch, actor=actor if getattr(actor, "pk", None) else None, actor_name=_actor_name(actor), source=source,
        action=action, reason=reason, target_type=decision.target_type, target_id=decision.target_id,
        before=before, after=after, outcome="done" if outcome else "skipped", message=decision.reason[:2000],
    )


def _require_reason(reason: str, source: str) -> str:
    if source not in OperatorAction.Source.values:
        raise ValueError(f"source must be one of {', '.join(OperatorAction.Source.values)}, not {source!r}.")
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("An operator action needs a reason.")
    return reason


def retry_rate_per_second() -> float:
    """``PIPELINE_OPS_RETRY_RATE``: how many retries per second a bulk retry releases (0 = all at once)."""
    return float(getattr(settings, "PIPELINE_OPS_RETRY_RATE", 5.0) or 0.0)


# --- retry --------------------------------------------------------------------------------------


def step_runs_retry_plan(*, step_runs: Iterable[StepRun], force: bool = False, now: datetime | None = None) -> list[Decision]:
    """What a retry of ``step_runs`` would do now, one Decision per step run. Writes nothing."""
    now = now or db_now()  # leases and due times are the database's (idempotency.clock)
    loaded = _step_runs_load(step_runs)
    records = step_run_records(step_runs=loaded)
    holders = _holders(records.values())
    return [
        _decide_retry(step_run, records.get(step_run.pk), holders.get(getattr(records.get(step_run.pk), "pk", None)), force=force, now=now)
        for step_run in loaded
    ]


def step_runs_retry(
    *,
    step_runs: Iterable[StepRun],
    actor,
    reason: str,
    source: str,
    force: bool = False,
    now: datetime | None = None,
    rate_per_second: float | None = None,
    on_decision: Callable[[Decision], None] | None = None,
    batch: uuid.UUID | None = None,
    spread_from: int = 0,
) -> ActionReport:
    """Retry step runs safely; one audit row per step run, in the transaction of its change.

    * completed (or cancelled, not started, already queued) -> skipped, with the reason;
    * a live lease -> refused unless ``force``; forced, the key is released so the live attempt
      is TIMED_OUT now and FENCED when it tries to complete;
    * an expired lease (stuck) -> released, then retried;
    * failed or waiting to retry -> the key is reopened, the step QUEUED and enqueued, the input
      back to RUNNING.

    Bulk retries are spread at ``rate_per_second`` (default: the ``PIPELINE_OPS_RETRY_RATE``
    setting; 0 = all at once): the first goes on the queue
    at once, later ones wait as RETRY_WAIT with ``next_attempt_at`` (and the key's ``retry_at``)
    in the future, and the reconciler sends them when due; nothing sleeps here.

    ``force`` is taken as given: callers check ``pipeline_ops.force_retry_steprun``.
    ``on_decision`` is called after each target's transaction; ``batch`` (default: a new one) is
    the id its audit rows share (a background run passes its own: ``services.bulk``), and
    ``spread_from`` how many of its retries earlier slices queued (the spread goes on from there).
    Raises ValueError for an empty reason or an unknown source.
    """
    reason = _require_reason(reason, source)
    now = now or db_now()  # leases and due times are the database's (idempotency.clock)
    batch = batch or uuid.uuid4()
    report = ActionReport(action=OperatorAction.Action.FORCE_RETRY if force else OperatorAction.Action.RETRY, verb="queued", batch=batch)
    rate = retry_rate_per_second() if rate_per_second is None else max(0.0, rate_per_second)
    for step_run_id in _pks(step_runs):
        delay = ((spread_from + report.done) / rate) if rate > 0 else 0.0
        due = now + timedelta(seconds=delay)
        decision = _step_run_retry_one(
            step_run_id=step_run_id, actor=actor, reason=reason, source=source, force=force, now=now, due=due, batch=batch
        )
        if decision is None:
            continue
        report.add(decision)
        if decision.acts:
            report.spread_seconds = max(report.spread_seconds, delay)
        if on_decision is not None:
            on_decision(decision)
    return report


def _step_run_retry_one(*, step_run_id, actor, reason, source, force, now, due, batch) -> Decision | None:
    with transaction.atomic():
        # Row locks (PostgreSQL; SQLite's IMMEDIATE transaction already excludes other writers)
        # in the one lock order (docs/guard.md): the step, its input, then its key, as a claiming,
        # completing or failing worker takes them, so the decision below cannot be overtaken by
        # a worker in between, and the two cannot deadlock.
        loaded = _step_runs_load([step_run_id], for_update=True)
        if not loaded:
            return None
        step_run = loaded[0]
        step_rows_lock(step_run_ids=[], input_id=step_run.input_id)  # the input before the key: it is updated below
        record = step_run_records(step_runs=[step_run], for_update=True).get(step_run.pk)
        holder = _holders([record]).get(record.pk) if record is not None else None
        decision = _decide_retry(step_run, record, holder, force=force, now=now)
        before = _step_snapshot(step_run, record)
        action = OperatorAction.Action.FORCE_RETRY if decision.kind == KIND_FORCED or force else OperatorAction.Action.RETRY
        if not decision.acts:
            _audit(batch=batch, actor=actor, source=source, action=action, reason=reason, decision=decision, before=before, after=before, outcome=False)
            return decision
        who = _actor_name(actor) or source
        if decision.kind in (KIND_FORCED, KIND_STUCK):
            guard.release(record=record, reason=f"{who}: {reason}", now=now)
        if record is not None and due > now:
            # The guard enforces the stagger: an early delivery finds the key not yet due (InFlight).
            guard.reopen(record=record, now=due)
        elif record is not None and decision.kind not in (KIND_FORCED, KIND_STUCK):
            guard.reopen(record=record, now=now)
        if due > now:
            # Already waiting is fine too: only its due time moves.
            sources = [*step_sources(StepStatus.RETRY_WAIT), StepStatus.RETRY_WAIT]
            moved = StepRun.objects.filter(pk=step_run.pk, status=step_run.status, status__in=sources).update(
                status=StepStatus.RETRY_WAIT, next_attempt_at=due, finished_at=None, updated_at=now
            )
        else:
            moved = StepRun.objects.filter(pk=step_run.pk, status=step_run.status, status__in=step_sources(StepStatus.QUEUED)).update(
                status=StepStatus.QUEUED, next_attempt_at=None, enqueued_at=now, finished_at=None, updated_at=now
            )
        if not moved:
            # The state table does not allow this move (or a worker moved the step): undo the
            # guard's moves with the rest of the transaction and say so.
            transaction.set_rollback(True)
            skipped = Decision(
                target=step_run, target_type="step_run", acts=False, kind=decision.kind,
                reason=MSG_CHANGED.format(reason=f"step is {step_run.status}"), record=record,
            )
            return skipped
        if due <= now:
            step_run_enqueue(step_run_id=step_run.pk)
        PipelineInput.objects.filter(pk=step_run.input_id, status__in=[InputStatus.FAILED, InputStatus.PENDING]).update(
            status=InputStatus.RUNNING, finished_at=None, updated_at=now
        )
        step_run.refresh_from_db()
        step_run.input.refresh_from_db(fields=["status"])
        if record is not None:
            record.refresh_from_db()
        _audit(
            batch=batch, actor=actor, source=source, action=action, reason=reason, decision=decision,
            before=before, after=_step_snapshot(step_run, record), outcome=True,
        )
        return decision


def _input_retry_targets(inputs: Iterable[PipelineInput]) -> list[StepRun]:
    """The steps a retry of these inputs is about: every step that started and did not succeed;
    for an input with none (all done, or nothing started), its last started step, so the plan can
    say why nothing happens ("already completed by attempt #2")."""
    steps = list(
        StepRun.objects.filter(input_id__in=_pks(inputs)).exclude(status=StepStatus.PENDING)
        .only("pk", "input_id", "position", "status").order_by("input_id", "position")
    )
    chosen: list[StepRun] = []
    by_input: dict[Any, list[StepRun]] = {}
    for step in steps:
        by_input.setdefault(step.input_id, []).append(step)
    for input_steps in by_input.values():
        open_steps = [s for s in input_steps if s.status != StepStatus.SUCCEEDED]
        chosen.extend(open_steps or input_steps[-1:])
    return chosen


def inputs_retry_plan(*, inputs: Iterable[PipelineInput], force: bool = False, now: datetime | None = None) -> list[Decision]:
    """What a retry of ``inputs`` would do, one Decision per affected step run. Writes nothing."""
    return step_runs_retry_plan(step_runs=_input_retry_targets(inputs), force=force, now=now)


def inputs_retry(
    *, inputs: Iterable[PipelineInput], actor, reason: str, source: str, force: bool = False,
    batch: uuid.UUID | None = None, spread_from: int = 0,
) -> ActionReport:
    """Retry the failed, waiting or stuck steps of each input (see ``step_runs_retry``).
    Raises ValueError for an empty reason or an unknown source."""
    return step_runs_retry(
        step_runs=_input_retry_targets(inputs), actor=actor, reason=reason, source=source, force=force,
        batch=batch, spread_from=spread_from,
    )


def input_retry(*, pipeline_input: PipelineInput, actor, reason: str, source: str, force: bool = False) -> ActionReport:
    """Retry one input's failed, waiting or stuck steps (see ``step_runs_retry``).
    Raises ValueError for an empty reason or an unknown source."""
    return inputs_retry(inputs=[pipeline_input], actor=actor, reason=reason, source=source, force=force)


# --- cancel -------------------------------------------------------------------------------------


def _decide_cancel(pipeline_input: PipelineInput) -> Decision:
    # A FAILED input may still be cancelled (it then stays out of retries and reports);
    # SUCCEEDED and CANCELLED ones are done.
    if pipeline_input.status in (InputStatus.SUCCEEDED, InputStatus.CANCELLED):
        return Decision(
            target=pipeline_input, target_type="input", acts=False, kind=KIND_TERMINAL,
            reason=MSG_INPUT_TERMINAL.format(status=pipeline_input.get_status_display().lower()),
        )
    return Decision(target=pipeline_input, target_type="input", acts=True, kind=KIND_ACTIVE, reason=f"{pipeline_input.get_status_display().lower()}: will be cancelled")


def _input_snapshot(pipeline_input: PipelineInput) -> dict[str, Any]:
    steps = dict(StepRun.objects.filter(input_id=pipeline_input.pk).values_list("step", "status"))
    return {"input_status": pipeline_input.status, "steps": steps}


def inputs_cancel_plan(*, inputs: Iterable[PipelineInput]) -> list[Decision]:
    """What cancelling ``inputs`` would do, one Decision per input. Writes nothing."""
    return [_decide_cancel(i) for i in PipelineInput.objects.filter(pk__in=_pks(inputs)).order_by("created_at")]


def inputs_cancel(
    *, inputs: Iterable[PipelineInput], actor, reason: str, source: str, batch: uuid.UUID | None = None,
) -> ActionReport:
    """Cancel inputs that are not finished: their pending and queued steps are CANCELLED and a
    running step's key is released, so its attempt is fenced if it ever tries to complete
    (``services.inputs.input_cancel``). Finished inputs are skipped with the reason. One audit
    row per input, in the transaction of its change. Raises ValueError for an empty reason or an unknown source."""
    from .inputs import input_cancel

    reason = _require_reason(reason, source)
    report = ActionReport(action=OperatorAction.Action.CANCEL, verb="cancelled", batch=batch or uuid.uuid4())
    for input_id in _pks(inputs):
        with transaction.atomic():
            # The one lock order (docs/guard.md): the input's step runs, then the input. Locking
            # the input first deadlocked with a worker claiming one of its steps, which holds the
            # step and then asks for the input.
            input_rows_lock(input_id=input_id)
            pipeline_input = PipelineInput.objects.filter(pk=input_id).first()
            if pipeline_input is None:
                continue
            decision = _decide_cancel(pipeline_input)
            before = _input_snapshot(pipeline_input)
            if decision.acts:
                input_cancel(pipeline_input=pipeline_input, reason=f"cancelled by {_actor_name(actor) or source}: {reason}")
                pipeline_input.refresh_from_db()
            _audit(
                batch=report.batch, actor=actor, source=source, action=OperatorAction.Action.CANCEL, reason=reason,
                decision=decision, before=before, after=_input_snapshot(pipeline_input) if decision.acts else before,
                outcome=decision.acts,
            )
        report.add(decision)
    return report


# --- release a stuck lease ----------------------------------------------------------------------


def _decide_release(step_run: StepRun, record: IdempotencyRecord | None, holder: Attempt | None, *, now: datetime) -> Decision:
    def decision(acts: bool, kind: str, reason: str) -> Decision:
        return Decision(target=step_run, target_type="step_run", acts=acts, kind=kind, reason=reason, record=record)

    if record is None or record.status != RecordStatus.PROCESSING:
        return decision(False, KIND_NO_LEASE, MSG_NO_LEASE.format(status=record.status.lower() if record else "never claimed"))
    if record.lease_expires_at is not None and record.lease_expires_at > now:
        return decision(False, KIND_RUNNING, f"{_running_reason(record, holder)} (a live lease: use a forced retry)")
    return decision(True, KIND_STUCK, f"lease expired at {_fmt_time(record.lease_expires_at)} (worker {holder.worker if holder else '?'}): released")


def step_runs_release_lease_plan(*, step_runs: Iterable[StepRun], now: datetime | None = None) -> list[Decision]:
    """What releasing the leases of ``step_runs`` would do. Writes nothing."""
    now = now or db_now()  # leases and due times are the database's (idempotency.clock)
    loaded = _step_runs_load(step_runs)
    records = step_run_records(step_runs=loaded)
    holders = _holders(records.values())
    return [_decide_release(s, records.get(s.pk), holders.get(getattr(records.get(s.pk), "pk", None)), now=now) for s in loaded]


def step_runs_release_lease(
    *, step_runs: Iterable[StepRun], actor, reason: str, source: str, now: datetime | None = None,
    batch: uuid.UUID | None = None,
) -> ActionReport:
    """Release expired (stuck) leases: the key becomes FAILED with a retry due now, the stuck
    attempt TIMED_OUT (FENCED if it ever completes), and the step waits as RETRY_WAIT due now, so
    the reconciler's next pass runs it. Live leases are refused (that is a forced retry).
    Raises ValueError for an empty reason or an unknown source."""
    reason = _require_reason(reason, source)
    now = now or db_now()  # leases and due times are the database's (idempotency.clock)
    report = ActionReport(action=OperatorAction.Action.RELEASE_LEASE, verb="released", batch=batch or uuid.uuid4())
    who = _actor_name(actor) or source
    for step_run_id in _pks(step_runs):
        with transaction.atomic():
            loaded = _step_runs_load([step_run_id], for_update=True)
            if not loaded:
                continue
            step_run = loaded[0]
            record = step_run_records(step_runs=[step_run], for_update=True).get(step_run.pk)
            holder = _holders([record]).get(record.pk) if record is not None else None
            decision = _decide_release(step_run, record, holder, now=now)
            before = _step_snapshot(step_run, record)
            if decision.acts:
                guard.release(record=record, reason=f"{who}: {reason}", now=now)
                StepRun.objects.filter(
                    pk=step_run.pk, status__in=[s for s in step_sources(StepStatus.RETRY_WAIT) if s != StepStatus.RETRY_WAIT]
                ).update(status=StepStatus.RETRY_WAIT, next_attempt_at=now, updated_at=now)
                step_run.refresh_from_db()
                record.refresh_from_db()
            _audit(
                batch=report.batch, actor=actor, source=source, action=OperatorAction.Action.RELEASE_LEASE, reason=reason,
                decision=decision, before=before, after=_step_snapshot(step_run, record) if decision.acts else before,
                outcome=decision.acts,
            )
        report.add(decision)
    return report
