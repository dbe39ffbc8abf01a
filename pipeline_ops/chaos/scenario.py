"""The incident replay: real clusters, a fault-injecting model server, SIGKILLs, and a count.

``run_guarded`` drives the product (``input_submit`` → django-q2 → ``step_run_execute_task`` under
the guard, the reconciler) and ``run_naive`` drives the control group (``chaos.naive``) through the
*same* faults: the same model server knobs and seed, the same clusters and broker, duplicate
enqueues of random steps, one busy worker SIGKILLed and one whole cluster SIGKILLed mid-step and
restarted. Both return a plain dict (the summary) that the command prints and the tests assert.

Late responses: the model server processes a stalled request and answers after
``stall_seconds``, past the client timeout. In the product the runner has already given up on that
call (its attempt ended UNKNOWN and a retry owns the key), so nobody is listening; in the
incident the abandoned call's handler wrote its result anyway. The guarded run replays that
handler: once the late answer is due, ``late_writes_deliver`` hands it to the timed-out attempt
through the very ``guard.complete(write=...)`` call the runner uses, with a real StepOutput
insert. The guard must fence every one of them, and the summary counts them.

Duplicates are counted from the effects log (``chaos.effects``), which has no unique constraint:
every guarded attempt that believed it won, every late write the guard accepted and every result
the control group stored appends a line, and ``effects_count`` counts both runs alike. The
output table's "rows beyond one per step" is still reported, under that name: it is a check of
the unique constraint, not of the guard.

``db_faults`` (PostgreSQL only) adds ``chaos.dbfaults``: the clusters' backends are terminated at
random moments and their sessions run with a short ``lock_timeout``.
"""
from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import Count
from django.test.utils import override_settings
from django.utils import timezone

from . import naive
from .brokers import use_broker
from .cluster import QCluster, base_env, database_url_for, stop_all
from .dbfaults import BackendTerminator, connect_params_for, db_faults_env
from .effects import EFFECTS_LOG_ENV, calls_count, deliveries_count, effect_append, effects_count, effects_read

WORDS = (
    "the model timed out while the retry succeeded and saved its result then the first call finished late "
    "great terrible calm network unstable queue worker duplicate record exactly once lease fence key "
    "happy angry report invoice customer shipment delayed refund arrived broken excellent service"
).split()


@dataclass
class ChaosConfig:
    inputs: int = 30
    clusters: int = 2
    workers: int = 2
    broker: str = "orm"
    queue: str = "pipeline_ops_chaos"
    seed: int = 7
    timeout: float = 240.0
    pipeline: str = "llm"
    # Model server knobs (the faults).
    latency_ms: int = 150
    error_rate: float = 0.08
    rate_429: float = 0.08
    stall_rate: float = 0.25
    stall_seconds: float = 3.0
    # Client side: the llm step's read timeout (< stall_seconds, so a stall is a timeout).
    client_timeout: float = 1.0
    # Short leases and django-q2 timeout so a SIGKILLed attempt is taken over within seconds.
    lease_seconds: int = 4
    step_timeout: int = 5
    # django-q2 redelivers a dead cluster's prefetched (never started) tasks only after `retry`;
    # 2 * step_timeout + margin keeps the rule retry >= (queue_limit/workers + 1) * timeout + margin.
    retry_seconds: int = 18
    reconcile_interval: float = 1.0
    lost_grace_seconds: int = 4
    duplicate_enqueues: int = 0  # 0: inputs // 4, at least 3
    kill_worker: bool = True
    kill_cluster: bool = True
    late_writes: bool = True
    # Database faults (PostgreSQL): a worker backend terminated every `db_fault_interval` seconds on
    # average, and a `lock_timeout_ms` lock timeout on the workers' sessions.
    db_faults: bool = False
    db_fault_interval: float = 1.0
    lock_timeout_ms: int = 100
    log_dir: Path = field(default_factory=lambda: Path(settings.VAR_DIR) / "chaos")
    settings_module: str = ""
    database_url: str = ""
    progress: Callable[[int, int, str], None] | None = None

    def __post_init__(self) -> None:
        if not self.settings_module:
            self.settings_module = os.environ.get("DJANGO_SETTINGS_MODULE", "pipeline_ops.settings")
        if not self.database_url:
            self.database_url = database_url_for(connection.settings_dict)
        if self.db_faults and connection.vendor != "postgresql":
            raise ValueError(f"db_faults needs PostgreSQL (pg_terminate_backend), not {connection.vendor}")
        if connection.vendor == "sqlite":
            self.clusters = 1  # SQLite has one writer: exactly one cluster (reference §8 gotcha 7)
        if not self.duplicate_enqueues:
            self.duplicate_enqueues = max(3, self.inputs // 4)

    def knobs(self) -> dict:
        return {
            "latency_ms": self.latency_ms, "error_rate": self.error_rate, "rate_429": self.rate_429,
            "stall_rate": self.stall_rate, "stall_seconds": self.stall_seconds,
        }

    def public(self) -> dict:
        data = asdict(self)
        data.pop("progress")
        data["log_dir"] = str(self.log_dir)
        return data


def texts(*, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))).capitalize() + "." for _ in range(count)]


def cluster_env(cfg: ChaosConfig, *, model_url: str, effects_log: Path, application_name: str = "") -> dict[str, str]:
    """Environment of every chaos cluster: django-q2 reads its settings once, at import."""
    faults = db_faults_env(application_name=application_name, lock_timeout_ms=cfg.lock_timeout_ms) if cfg.db_faults else {}
    policies = {
        step: {"lease_seconds": cfg.lease_seconds} for step in settings.PIPELINES[cfg.pipeline]["steps"]
    }
    return base_env(
        DJANGO_SETTINGS_MODULE=cfg.settings_module,
        DATABASE_URL=cfg.database_url,
        SECRET_KEY=settings.SECRET_KEY,  # payloads are signed with SECRET_KEY + queue name
        PIPELINE_OPS_BROKER=cfg.broker,
        PIPELINE_OPS_QUEUE=cfg.queue,
        REDIS_URL=settings.REDIS_URL,
        Q_WORKERS=cfg.workers,
        Q_POLL="0.1",
        Q_LOG_LEVEL="ERROR",
        STEP_TIMEOUT_SECONDS=cfg.step_timeout,
        Q_RETRY_SECONDS=cfg.retry_seconds,
        IDEMPOTENCY_LEASE_SECONDS=cfg.lease_seconds,
        PIPELINE_STEP_POLICIES=json.dumps(policies),
        LLM_BASE_URL=model_url,
        LLM_TIMEOUT_SECONDS=cfg.client_timeout,
        LLM_CONNECT_TIMEOUT_SECONDS=2,
        LOG_LEVEL="ERROR",
        **{EFFECTS_LOG_ENV: str(effects_log)},
        **faults,
    )


def _effects_log(cfg: ChaosConfig, label: str, run_id: str) -> Path:
    """A fresh effects log per run (one file per run: nothing to filter, nothing left over)."""
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.log_dir / f"effects-{label}-{run_id}.jsonl"
    path.unlink(missing_ok=True)
    return path


def _start_db_faults(cfg: ChaosConfig, *, application_name: str) -> BackendTerminator | None:
    if not cfg.db_faults:
        return None
    return BackendTerminator(
        connect_params=connect_params_for(connection.settings_dict), application_name=application_name,
        interval=cfg.db_fault_interval, seed=cfg.seed,
    ).start()


def _queue_left(broker, kind: str) -> int:
    """Messages still in the run's queue when every input was terminal (issue 12's figure)."""
    if kind == "redis":
        return int(broker.queue_size())
    from django_q.models import OrmQ

    return OrmQ.objects.filter(key=broker.list_key).count()  # locked (taken, not acked) rows too


class _QueueWatch:
    """The queue's length against the QUEUED steps, once a second during the run: a reconciler
    that re-sends messages that were only waiting shows as a queue far longer than the work."""

    def __init__(self, broker, kind: str, steps):
        self.broker, self.kind, self.steps = broker, kind, steps
        self.peak, self.queued_at_peak, self.worst_ratio, self._last = 0, 0, 0.0, 0.0

    def sample(self) -> None:
        if time.monotonic() - self._last < 1.0:
            return
        self._last = time.monotonic()
        from pipeline_ops.states import StepStatus

        length = _queue_left(self.broker, self.kind)
        queued = self.steps.filter(status=StepStatus.QUEUED).count()
        if length > self.peak:
            self.peak, self.queued_at_peak = length, queued
        if length > 10:  # a handful of messages over an empty step table is no flood
            self.worst_ratio = max(self.worst_ratio, length / max(1, queued))

    def as_dict(self) -> dict:
        return {"peak": self.peak, "queued_steps_at_peak": self.queued_at_peak, "worst_ratio": round(self.worst_ratio, 2)}


def _start_model_server(cfg: ChaosConfig):
    from pipeline_ops.model_server import ModelServer

    server = ModelServer(host="127.0.0.1", port=0, honour_keys=True, seed=cfg.seed, **cfg.knobs())
    server.start()
    return server


class _Faults:
    """SIGKILLs and duplicate enqueues, spread over the run by progress (0..1)."""

    def __init__(self, cfg: ChaosConfig, clusters: list[QCluster], rng: random.Random,
                 running_attempt: Callable[[int], tuple[str, str] | None] | None = None):
        self.cfg, self.clusters, self.rng = cfg, clusters, rng
        # pid -> (attempt id, key) of the attempt that worker runs, read just before the SIGKILL.
        self.running_attempt = running_attempt
        self.killed_attempt_ids: list[str] = []
        self.counts = Counter()
        self.killed_tasks: list[str] = []
        self.killed_pids: list[int] = []
        self._restarting: threading.Thread | None = None

    def duplicate_due(self, progress: float) -> bool:
        target = round(self.cfg.duplicate_enqueues * min(1.0, progress / 0.8 + 0.1))
        return self.counts["duplicate_enqueues"] < target

    def _mid_model_call(self, cluster: QCluster) -> dict[int, tuple[str, str | None]]:
        """Busy workers of ``cluster`` that are inside the model call right now (the long step):
        pid -> (task name, running attempt id). Killing them is "mid-step" for sure; the offline
        steps take milliseconds, so a worker caught on one usually finishes before the signal."""
        found = {}
        for pid, task in cluster.busy_workers().items():
            if self.running_attempt is not None:
                running = self.running_attempt(pid)
                if running and running[1].endswith(":llm"):
                    found[pid] = (task, running[0])
            elif task.startswith("naive:") and task.endswith(":2"):  # the control group's llm step
                found[pid] = (task, None)
        return found

    def kill_busy_worker(self, *, any_busy: bool = False) -> bool:
        """SIGKILL one worker that is inside a model call (``any_busy``: running any task)."""
        for cluster in self.rng.sample(self.clusters, len(self.clusters)):
            if not cluster.alive:
                continue
            targets = (
                {pid: (task, None) for pid, task in cluster.busy_workers().items()} if any_busy
                else self._mid_model_call(cluster)
            )
            for pid, (task, attempt_id) in targets.items():
                if cluster.kill_worker(pid):
                    if attempt_id:
                        self.killed_attempt_ids.append(attempt_id)
                    self.counts["workers_sigkilled"] += 1
                    self.killed_tasks.append(task)
                    self.killed_pids.append(pid)
                    return True
        return False

    def kill_cluster(self, *, any_busy: bool = False) -> bool:
        """SIGKILL a whole cluster while it is inside a model call (``any_busy``: running any task),
        and restart it a second later."""
        for victim in self.rng.sample(self.clusters, len(self.clusters)):
            if not victim.alive:
                continue
            mid = self._mid_model_call(victim)
            if not mid and not (any_busy and victim.busy_workers()):
                continue
            busy = victim.busy_workers()
            self.killed_attempt_ids.extend(attempt_id for _, attempt_id in mid.values() if attempt_id)
            self.killed_tasks.extend(busy.values())
            self.killed_pids.extend(busy)
            victim.kill()
            self.counts["clusters_sigkilled"] += 1

            def restart(victim: QCluster = victim) -> None:
                time.sleep(1.0)
                victim.start(wait=True, timeout=90)
                self.counts["clusters_restarted"] += 1

            self._restarting = threading.Thread(target=restart, daemon=True)
            self._restarting.start()
            return True
        return False

    def join(self) -> None:
        if self._restarting is not None:
            self._restarting.join(timeout=120)


def _start_clusters(cfg: ChaosConfig, env: dict[str, str], label: str) -> list[QCluster]:
    clusters = [
        QCluster(env=env, name=f"{label}-{i}", log_path=cfg.log_dir / f"{label}-{i}.log") for i in range(cfg.clusters)
    ]
    for cluster in clusters:
        cluster.start(wait=False)
    for cluster in clusters:
        cluster.wait_ready(timeout=90)
    return clusters


def _purge(broker) -> None:
    try:
        broker.purge_queue()
    except Exception:  # noqa: BLE001 - an empty Redis list or OrmQ key is fine
        pass


# --- the guarded run ------------------------------------------------------------------------------


def run_guarded(cfg: ChaosConfig) -> dict:
    """Run the scenario through the product and return its summary."""
    from pipeline_ops.models import PipelineInput, StepRun
    from pipeline_ops.queueing import step_run_enqueue
    from pipeline_ops.reconciler import reconcile_once
    from pipeline_ops.services.inputs import input_submit
    from pipeline_ops.states import INPUT_TERMINAL, STEP_TERMINAL, StepStatus

    rng = random.Random(cfg.seed)
    run_id = uuid.uuid4().hex[:10]
    scope = f"chaos:{run_id}"
    server = _start_model_server(cfg)
    clusters: list[QCluster] = []
    faults = _Faults(cfg, clusters, rng, running_attempt=_running_attempt)
    effects_log = _effects_log(cfg, "guarded", run_id)
    late = _LateWrites(stall_seconds=cfg.stall_seconds, effects_log=effects_log)
    application_name = f"pipeline_ops_chaos_{run_id}"
    terminator: BackendTerminator | None = None
    db_faults: dict = {}
    queue_left = None
    queue_watch: _QueueWatch | None = None
    started = time.monotonic()
    reconciler_runs = 0
    timed_out = False
    try:
        with use_broker(kind=cfg.broker, queue=cfg.queue) as broker, override_settings(
            RECONCILER_LOST_GRACE_SECONDS=cfg.lost_grace_seconds
        ):
            _purge(broker)
            env = cluster_env(cfg, model_url=server.url, effects_log=effects_log, application_name=application_name)
            clusters.extend(_start_clusters(cfg, env, "guarded"))
            terminator = _start_db_faults(cfg, application_name=application_name)
            for i, text in enumerate(texts(count=cfg.inputs, seed=cfg.seed)):
                input_submit(pipeline=cfg.pipeline, payload={"text": text}, scope=scope, key=f"chaos-{i}")
            inputs = PipelineInput.objects.filter(submission_scope=scope)
            steps = StepRun.objects.filter(input__submission_scope=scope)
            total_steps = steps.count()
            last_reconcile = 0.0
            queue_watch = _QueueWatch(broker, cfg.broker, steps)
            worker_kill_at = rng.uniform(0.15, 0.35)
            cluster_kill_at = rng.uniform(0.4, 0.6)
            while True:
                close_old_connections()
                done_steps = steps.filter(status__in=STEP_TERMINAL).count()
                progress = done_steps / max(1, total_steps)
                open_inputs = inputs.exclude(status__in=INPUT_TERMINAL).count()
                if cfg.progress:
                    cfg.progress(done_steps, total_steps, f"guarded {cfg.broker}: {cfg.inputs - open_inputs}/{cfg.inputs} inputs")
                queue_watch.sample()
                if open_inputs == 0 and (not cfg.late_writes or late.settled(scope=scope)):
                    break
                if time.monotonic() - started > cfg.timeout:
                    timed_out = True
                    break
                if faults.duplicate_due(progress):
                    candidates = list(
                        steps.exclude(status=StepStatus.PENDING).values_list("pk", flat=True)[:5000]
                    )
                    if candidates:
                        with transaction.atomic():  # ORM broker: the queue row commits with us
                            step_run_enqueue(step_run_id=rng.choice(candidates))
                        faults.counts["duplicate_enqueues"] += 1
                if cfg.kill_worker and not faults.counts["workers_sigkilled"] and progress >= worker_kill_at:
                    faults.kill_busy_worker(any_busy=progress > 0.9)
                if (
                    cfg.kill_cluster and not faults.counts["clusters_sigkilled"] and progress >= cluster_kill_at
                ):
                    faults.kill_cluster(any_busy=progress > 0.9)
                if cfg.late_writes:
                    late.deliver(scope=scope)
                if time.monotonic() - last_reconcile >= cfg.reconcile_interval:
                    reconcile_once()
                    reconciler_runs += 1
                    last_reconcile = time.monotonic()
                time.sleep(0.05)
            if terminator is not None:
                db_faults = terminator.stop()
            faults.join()
            queue_left = _queue_left(broker, cfg.broker)
    finally:
        if terminator is not None and not db_faults:
            db_faults = terminator.stop()
        stop_all(clusters, timeout=20)
        served = _server_stats(server)
        server.stop()
    summary = guarded_summary(scope=scope, calls=served["calls"], effects_log=effects_log)
    summary["killed_attempts"] = killed_attempts(ids=faults.killed_attempt_ids)
    summary.update(
        mode="guarded", run=run_id, broker=cfg.broker, database=connection.vendor,
        clusters=cfg.clusters, workers=cfg.workers, elapsed_seconds=round(time.monotonic() - started, 1),
        timed_out=timed_out, reconciler_runs=reconciler_runs,
        faults={**served["injected"], **dict(faults.counts), "late_writes_delivered": late.delivered,
                **db_faults, "killed_tasks": faults.killed_tasks},
        db_faults=cfg.db_faults, lock_timeout_ms=cfg.lock_timeout_ms if cfg.db_faults else None,
        queue_messages_left=queue_left, queue=queue_watch.as_dict() if queue_watch else {}, effects_log=str(effects_log),
        late_writes_fenced=late.fenced, late_writes_accepted=late.accepted,
        # A late answer is handed to an UNKNOWN attempt, which then ends FENCED: count it once.
        unknown_outcomes=summary["unknown_outcomes"] + late.delivered,
        knobs=cfg.knobs(),
    )
    # The broker's and reconciler's own share: deliveries less the ones the scenario asked for
    # (its duplicate enqueues, and the retries its injected errors and kills scheduled: one
    # delivery per attempt beyond a key's first). Above 1.0 it is redelivery nobody asked for.
    steps_total = summary["steps"] or 1
    summary["deliveries_per_step_beyond_the_scenario"] = round(
        (summary["deliveries"]["total"] - faults.counts["duplicate_enqueues"] - summary["retries"]) / steps_total, 3
    )
    summary["integrity"] = integrity_check()
    summary["ok"] = (
        summary["duplicates"] == 0 and summary["lost"] == 0 and summary["integrity"]["ok"]
        and summary["failed_by_infrastructure"] == 0 and summary["output_rows_beyond_one_per_step"] == 0
    )
    return summary


class _LateWrites:
    """The abandoned calls' handlers, replayed through the guard (see the module docstring)."""

    def __init__(self, *, stall_seconds: float, effects_log: Path):
        self.stall_seconds = stall_seconds
        self.effects_log = effects_log
        self.delivered = 0
        self.fenced = 0
        self.accepted = 0
        self._done: set = set()

    def _due(self, *, scope: str):
        from idempotency.models import Attempt
        from idempotency.states import AttemptStatus

        cutoff = timezone.now() - timedelta(seconds=self.stall_seconds)
        return (
            Attempt.objects.filter(status=AttemptStatus.UNKNOWN, started_at__lte=cutoff)
            .exclude(pk__in=self._done)
            .select_related("record")
            .filter(record__key__in=_step_keys(scope))
        )

    def settled(self, *, scope: str) -> bool:
        from idempotency.models import Attempt
        from idempotency.states import AttemptStatus

        return not Attempt.objects.filter(status=AttemptStatus.UNKNOWN, record__key__in=_step_keys(scope)).exclude(
            pk__in=self._done
        ).exists()

    def deliver(self, *, scope: str) -> None:
        from idempotency import guard
        from pipeline_ops.models import StepOutput, StepRun

        for attempt in list(self._due(scope=scope)[:50]):
            self._done.add(attempt.pk)
            input_id, step = attempt.record.key.rsplit(":", 1)
            step_run = StepRun.objects.get(input_id=input_id, step=step)
            late_output = {"content": "(late answer of a timed-out call)", "late": True, "attempt": attempt.number}

            def write(step_run=step_run, attempt=attempt, late_output=late_output) -> None:
                StepOutput.objects.create(
                    step_run=step_run, input_id=step_run.input_id, step=step_run.step, attempt=attempt, output=late_output
                )

            completion = guard.complete(attempt=attempt, result=late_output, write=write)
            self.delivered += 1
            if completion.fenced:
                self.fenced += 1
            else:
                # The guard let a late write through: an effect like any other, and the counter sees it.
                self.accepted += 1
                effect_append(key=attempt.record.key, source="late", attempt=attempt.number, path=self.effects_log)


_KEYS_CACHE: dict[str, list[str]] = {}


def _step_keys(scope: str) -> list[str]:
    from pipeline_ops.models import StepRun

    keys = _KEYS_CACHE.get(scope)
    if keys is None:
        keys = [f"{i}:{s}" for i, s in StepRun.objects.filter(input__submission_scope=scope).values_list("input_id", "step")]
        _KEYS_CACHE[scope] = keys
    return keys


def _server_stats(server) -> dict:
    """The model server's own counters: calls per key and the faults it injected."""
    stats = server.stats()
    return {
        "calls": dict(stats.get("calls_by_key") or server.calls_by_key()),
        "injected": {name: stats.get(name, 0) for name in ("stalls", "errors_500", "errors_429", "replayed")},
    }


def guarded_summary(*, scope: str, calls: dict[str, int], effects_log: Path) -> dict:
    """Counts for one guarded run: duplicates from the effects log, the rest from the database
    (and the model server's own per-key call counts)."""
    from idempotency.models import Attempt, IdempotencyRecord
    from idempotency.states import AttemptStatus
    from pipeline_ops.models import PipelineInput, StepOutput, StepRun
    from pipeline_ops.states import INPUT_TERMINAL, InputStatus, StepStatus

    inputs = PipelineInput.objects.filter(submission_scope=scope)
    steps = StepRun.objects.filter(input__submission_scope=scope)
    outputs = StepOutput.objects.filter(input__submission_scope=scope)
    keys = _step_keys(scope)
    records = IdempotencyRecord.objects.filter(key__in=keys)
    attempts = Attempt.objects.filter(record__in=records)
    by_status = dict(attempts.values_list("status").annotate(n=Count("pk")).values_list("status", "n"))
    output_rows = outputs.count()
    distinct_outputs = outputs.values("input_id", "step").distinct().count()
    not_terminal = inputs.exclude(status__in=INPUT_TERMINAL).count()
    succeeded_without_output = steps.filter(status=StepStatus.SUCCEEDED, output__isnull=True).count()
    succeeded_inputs_missing = (
        inputs.filter(status=InputStatus.SUCCEEDED).exclude(steps__status=StepStatus.SUCCEEDED).distinct().count()
        + inputs.filter(status=InputStatus.SUCCEEDED).filter(steps__output__isnull=True).distinct().count()
    )
    run_calls = {k: n for k, n in calls.items() if k in set(keys)}
    llm_steps = steps.filter(step="llm").count()
    lines = effects_read(effects_log)
    effects = effects_count(lines, keys=keys)
    deliveries = deliveries_count(lines, tasks=[f"step_run:{pk}" for pk in steps.values_list("pk", flat=True)])
    llm_keys = [key for key in keys if key.endswith(":llm")]
    infrastructure = failed_by_infrastructure(steps=steps)
    return {
        "inputs": inputs.count(),
        "inputs_by_status": dict(inputs.values_list("status").annotate(n=Count("pk")).values_list("status", "n")),
        "steps": steps.count(),
        "steps_by_status": dict(steps.values_list("status").annotate(n=Count("pk")).values_list("status", "n")),
        "attempts": attempts.count(),
        "attempts_by_status": by_status,
        "retries": attempts.count() - records.count(),
        "fenced": by_status.get(AttemptStatus.FENCED, 0),
        "unknown_outcomes": by_status.get(AttemptStatus.UNKNOWN, 0),
        "model_calls": sum(run_calls.values()),
        "model_keys": len(run_calls),
        "model_steps": llm_steps,
        "model_calls_beyond_one_per_key": sum(run_calls.values()) - len(run_calls),
        "model_calls_per_key": calls_count(run_calls, keys=llm_keys),
        "outputs": output_rows,
        # Can only be non-zero if StepOutput's unique constraint were gone: a check of the schema.
        "output_rows_beyond_one_per_step": output_rows - distinct_outputs,
        "effects": effects,
        "effects_total": effects["total"],
        "effects_max": effects["max"],
        "duplicates": effects["duplicates"],
        "deliveries": deliveries,
        "deliveries_per_step": deliveries["per_step"],
        "failed_by_infrastructure": infrastructure["count"],
        "failed_steps_by_last_error": infrastructure["by_error_type"],
        "failed_by_infrastructure_steps": infrastructure["steps"],
        "lost": not_terminal + succeeded_without_output + succeeded_inputs_missing,
        "lost_detail": {
            "inputs_not_terminal": not_terminal,
            "succeeded_steps_without_output": succeeded_without_output,
            "succeeded_inputs_missing_outputs": succeeded_inputs_missing,
        },
    }


def failed_by_infrastructure(*, steps) -> dict:
    """Steps that ended FAILED whose last failed attempt's error is the platform's, not the work's.

    Judged by the one classifier (``idempotency.faults``) from what the attempt stored (its
    error's class name and message). Only injected model errors may fail a step; a database blip
    never should.
    """
    from idempotency.faults import is_infrastructure_error_type
    from idempotency.models import Attempt
    from idempotency.states import AttemptStatus
    from pipeline_ops.states import StepStatus

    failed = {f"{input_id}:{step}": pk for pk, input_id, step in
              steps.filter(status=StepStatus.FAILED).values_list("pk", "input_id", "step")}
    last: dict[str, tuple[str, str]] = {}
    for key, error_type, message in (
        Attempt.objects.filter(record__key__in=list(failed),
                               status__in=[AttemptStatus.FAILED, AttemptStatus.UNKNOWN, AttemptStatus.TIMED_OUT])
        .order_by("record__key", "number").values_list("record__key", "error_type", "error_message")
    ):
        last[key] = (error_type, message)  # ordered by number: the last one wins
    by_type = Counter(error_type or "(none)" for error_type, _ in last.values())
    infrastructure = sorted(
        failed[key] for key, (error_type, message) in last.items()
        if is_infrastructure_error_type(error_type, message, vendor=connection.vendor)
    )
    return {"count": len(infrastructure), "by_error_type": dict(by_type), "steps": infrastructure[:20]}


def _running_attempt(pid: int) -> tuple[str, str] | None:
    """The attempt a worker process is running now, from ``Attempt.worker`` ("host:pid")."""
    from idempotency.guard import default_worker
    from idempotency.models import Attempt
    from idempotency.states import AttemptStatus

    host = default_worker().rsplit(":", 1)[0]
    found = (
        Attempt.objects.filter(worker=f"{host}:{pid}", status=AttemptStatus.RUNNING)
        .values_list("pk", "record__key").first()
    )
    return (str(found[0]), found[1]) if found else None


def killed_attempts(*, ids: list[str]) -> list[dict]:
    """Where the attempts that were RUNNING in the SIGKILLed workers ended up."""
    from idempotency.models import Attempt

    return [
        {"id": str(pk), "key": key, "number": number, "status": status, "worker": worker}
        for pk, key, number, status, worker in Attempt.objects.filter(pk__in=ids).values_list(
            "pk", "record__key", "number", "status", "worker")
    ]


def integrity_check() -> dict:
    """What ``verify_integrity`` checks, on the whole database: {'ok', 'counts', 'violations'}."""
    from pipeline_ops.integrity import integrity_check as check

    report = check().as_dict()
    return {"ok": report["ok"], "counts": report["counts"], "violations": report["violations"][:20],
            "notes": report["notes"]}


# --- the control group ----------------------------------------------------------------------------


def run_naive(cfg: ChaosConfig) -> dict:
    """The same scenario through the plain retry loop (``chaos.naive``); returns its summary."""
    rng = random.Random(cfg.seed)
    run_id = uuid.uuid4().hex[:10]
    steps = list(settings.PIPELINES[cfg.pipeline]["steps"])
    items = [(str(uuid.UUID(int=rng.getrandbits(128))), text) for text in texts(count=cfg.inputs, seed=cfg.seed)]
    naive.naive_table_reset()
    effects_log = _effects_log(cfg, "naive", run_id)
    application_name = f"pipeline_ops_chaos_{run_id}"
    terminator: BackendTerminator | None = None
    db_faults: dict = {}
    queue_left = None
    server = _start_model_server(cfg)
    clusters: list[QCluster] = []
    faults = _Faults(cfg, clusters, rng)
    started = time.monotonic()
    timed_out = False
    quiet_seconds = cfg.stall_seconds + cfg.client_timeout + 4
    try:
        with use_broker(kind=cfg.broker, queue=cfg.queue) as broker:
            _purge(broker)
            env = cluster_env(cfg, model_url=server.url, effects_log=effects_log, application_name=application_name)
            clusters.extend(_start_clusters(cfg, env, "naive"))
            terminator = _start_db_faults(cfg, application_name=application_name)
            common = {"steps": steps, "model_url": server.url, "client_timeout": cfg.client_timeout,
                      "stall_seconds": cfg.stall_seconds}
            for input_id, text in items:
                naive.naive_enqueue(run=run_id, input_id=input_id, position=0, text=text, **common)
            worker_kill_at = rng.uniform(0.15, 0.35)
            cluster_kill_at = rng.uniform(0.4, 0.6)
            last_rows, last_change = -1, time.monotonic()
            while True:
                close_old_connections()
                counts = naive.naive_counts(run=run_id)
                finished = naive.naive_finished_inputs(run=run_id, last_step=steps[-1])
                progress = counts["distinct"] / max(1, len(items) * len(steps))
                if cfg.progress:
                    cfg.progress(counts["distinct"], len(items) * len(steps), f"naive {cfg.broker}: {len(finished)}/{len(items)} inputs")
                if counts["rows"] != last_rows:
                    last_rows, last_change = counts["rows"], time.monotonic()
                quiet = time.monotonic() - last_change
                # Stop once nothing has been written for longer than a late answer takes to come
                # back: the abandoned calls have had their chance to write (the incident).
                if len(finished) == len(items) and quiet >= quiet_seconds:
                    break
                if quiet >= max(quiet_seconds, 15) and faults.counts["clusters_sigkilled"] and progress > 0.6:
                    break  # what is left was lost with a killed worker (ORM: back only after `retry`)
                if time.monotonic() - started > cfg.timeout:
                    timed_out = True
                    break
                if faults.duplicate_due(progress):
                    input_id, text = rng.choice(items)
                    done_positions = [i for i, s in enumerate(steps) if s in _naive_steps_done(run_id, input_id)] or [0]
                    naive.naive_enqueue(run=run_id, input_id=input_id, position=rng.choice(done_positions), text=text, **common)
                    faults.counts["duplicate_enqueues"] += 1
                if cfg.kill_worker and not faults.counts["workers_sigkilled"] and progress >= worker_kill_at:
                    faults.kill_busy_worker(any_busy=progress > 0.9)
                if cfg.kill_cluster and not faults.counts["clusters_sigkilled"] and progress >= cluster_kill_at:
                    faults.kill_cluster(any_busy=progress > 0.9)
                time.sleep(0.1)
            if terminator is not None:
                db_faults = terminator.stop()
            faults.join()
            queue_left = _queue_left(broker, cfg.broker)
    finally:
        if terminator is not None and not db_faults:
            db_faults = terminator.stop()
        stop_all(clusters, timeout=20)
        served = _server_stats(server)
        server.stop()
    calls = served["calls"]
    counts = naive.naive_counts(run=run_id)
    finished = naive.naive_finished_inputs(run=run_id, last_step=steps[-1])
    keys = {f"{input_id}:{step}" for input_id, _ in items for step in steps}
    run_calls = {k: n for k, n in calls.items() if k in keys}
    # The same counter as the guarded run: one line per stored result, no constraint.
    lines = effects_read(effects_log)
    effects = effects_count(lines, keys=sorted(keys))
    deliveries = deliveries_count(lines, tasks=[f"naive:{input_id}:{i}" for input_id, _ in items for i in range(len(steps))])
    return {
        "mode": "naive", "run": run_id, "broker": cfg.broker, "database": connection.vendor,
        "clusters": cfg.clusters, "workers": cfg.workers,
        "elapsed_seconds": round(time.monotonic() - started, 1), "timed_out": timed_out,
        "inputs": len(items), "steps": len(items) * len(steps),
        "outputs": counts["rows"], "late_rows": counts["late_rows"],
        "output_rows_beyond_one_per_step": counts["duplicates"], "duplicated_steps": counts["duplicated_pairs"],
        "effects": effects, "effects_total": effects["total"], "effects_max": effects["max"],
        "duplicates": effects["duplicates"],
        "deliveries": deliveries, "deliveries_per_step": deliveries["per_step"],
        "queue_messages_left": queue_left, "effects_log": str(effects_log),
        "db_faults": cfg.db_faults,
        # The control group has no attempts to classify: a step it gave up on is simply missing.
        "failed_by_infrastructure": None,
        "lost": len(items) - len(finished),
        "model_calls": sum(run_calls.values()), "model_keys": len(run_calls),
        "model_calls_beyond_one_per_key": sum(run_calls.values()) - len(run_calls),
        "model_calls_per_key": calls_count(run_calls, keys=sorted(k for k in keys if k.endswith(":llm"))),
        "faults": {**served["injected"], **dict(faults.counts), **db_faults, "killed_tasks": faults.killed_tasks},
        "knobs": cfg.knobs(),
    }


def _naive_steps_done(run: str, input_id: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT DISTINCT step FROM {naive.TABLE} WHERE run = %s AND input_id = %s", [run, input_id])
        return {row[0] for row in cursor.fetchall()}


def stderr_progress(every: float = 5.0) -> Callable[[int, int, str], None]:
    """A progress line on stderr at most every ``every`` seconds (the command uses a bar on a TTY)."""
    state = {"last": 0.0}

    def report(done: int, total: int, label: str) -> None:
        now = time.monotonic()
        if now - state["last"] >= every:
            state["last"] = now
            print(f"  {label}; steps {done}/{total}", file=sys.stderr, flush=True)

    return report
