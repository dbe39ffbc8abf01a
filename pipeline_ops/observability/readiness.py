"""Worker readiness reports: each django-q2 worker says, in a file of its own, that it is up and
what it is running, so a harness that started the cluster knows without reading process titles.

Why not titles: django-q2 sets them with setproctitle, which pads the original command line's
memory with NULs when the title is shorter than it (psutil then returns trailing empty strings),
so matching titles depended on how long the checkout's path was; without setproctitle there is
no title at all. The worker's own word does not depend on either.

Inert unless ``PIPELINE_OPS_READINESS_DIR`` is set in the cluster's environment (only
``pipeline_ops.chaos.cluster.QCluster`` sets it, to a fresh directory per start): production
connects nothing and writes nothing. When set, three django-q2 signals sent inside the worker
process write ``<dir>/worker-<pid>.json`` (replaced atomically, so a reader never sees half a file):

* ``post_spawn`` (the worker entered its loop and reads the task queue next): ``idle``;
* ``pre_execute`` (a task is about to run): ``busy`` and the task's name;
* ``post_execute_in_worker`` (it ran): ``idle`` again.

A SIGKILLed worker leaves its last report behind: readers must check that the pid still lives
(``pipeline_ops.chaos.cluster`` keeps only pids of the cluster's own live processes).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

READINESS_DIR_ENV = "PIPELINE_OPS_READINESS_DIR"
IDLE = "idle"
BUSY = "busy"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerReport:
    """What one worker last said about itself."""

    pid: int
    parent_pid: int
    state: str  # IDLE or BUSY
    task: str | None  # the running task's name when BUSY


def readiness_connect() -> None:
    """Connect the report writers when the environment asks for them (called from AppConfig.ready)."""
    if not os.environ.get(READINESS_DIR_ENV):
        return
    from django_q.signals import post_execute_in_worker, post_spawn, pre_execute

    post_spawn.connect(_on_spawn, dispatch_uid="pipeline_ops.readiness.spawn")
    pre_execute.connect(_on_execute, dispatch_uid="pipeline_ops.readiness.execute")
    post_execute_in_worker.connect(_on_executed, dispatch_uid="pipeline_ops.readiness.executed")


def readiness_reports(directory: str | Path) -> dict[int, WorkerReport]:
    """pid -> the last report of every worker that wrote one in ``directory`` (dead ones included)."""
    reports = {}
    try:
        paths = list(Path(directory).glob("worker-*.json"))
    except OSError:
        return {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
            report = WorkerReport(pid=int(data["pid"]), parent_pid=int(data["parent_pid"]),
                                  state=str(data["state"]), task=data.get("task"))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # removed meanwhile, or not ours: never a reason to fail a reader
        reports[report.pid] = report
    return reports


def _on_spawn(sender, proc_name=None, **kwargs) -> None:
    _report(state=IDLE, task=None)


def _on_execute(sender, func=None, task=None, **kwargs) -> None:
    _report(state=BUSY, task=(task or {}).get("name"))


def _on_executed(sender, func=None, task=None, **kwargs) -> None:
    _report(state=IDLE, task=None)


def _report(*, state: str, task: str | None) -> None:
    # A signal receiver that raises would kill the worker (django-q2 does not catch it) or fail
    # the task: a full disk must cost a missing report, never work.
    directory = os.environ.get(READINESS_DIR_ENV)
    if not directory:
        return
    pid = os.getpid()
    path = os.path.join(directory, f"worker-{pid}.json")
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w") as out:
            json.dump({"pid": pid, "parent_pid": os.getppid(), "state": state, "task": task}, out)
        os.replace(temporary, path)
    except OSError:
        logger.warning("readiness report not written to %s", directory, exc_info=True)
