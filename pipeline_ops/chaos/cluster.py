"""Real ``qcluster`` processes as children: start, wait until ready, SIGKILL, restart, stop.

Used by ``manage.py chaos``, ``manage.py demo``, ``bench/pipeline_throughput.py`` and the cluster
tests. django-q2 reads ``Q_CLUSTER`` once at import, so each cluster is configured through its own
process environment (DATABASE_URL, PIPELINE_OPS_BROKER, PIPELINE_OPS_QUEUE, Q_WORKERS,
STEP_TIMEOUT_SECONDS, ...), never through settings overrides in the parent.

Every cluster runs in its own session (process group) so that a "host crash" is one
``killpg(SIGKILL)`` and so that cleanup can never miss a forked worker; every cluster this module
started is killed at interpreter exit even if the caller forgets to stop it.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pipeline_ops.observability.readiness import BUSY, READINESS_DIR_ENV, WorkerReport, readiness_reports

BASE_DIR = Path(__file__).resolve().parent.parent.parent
# A starting cluster that shows no progress for this long is stuck (a hung broker, a wedged
# import): on an idle machine a start takes about a second, a loaded one is slower but moves.
STALL_SECONDS = 30.0
# Only a safety net for a wait whose progress never ends (it should never be what stops a wait).
WAIT_CEILING_SECONDS = 900.0
POLL_SECONDS = 0.1

_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


class ClusterError(RuntimeError):
    """A cluster did not start, or did not stop, in time."""


def base_env(**overrides: str | int | float | None) -> dict[str, str]:
    """The parent's environment with ``overrides`` applied (None removes a variable)."""
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "pipeline_ops.settings")
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def database_url_for(settings_dict: dict) -> str:
    """A DATABASE_URL for the database Django is connected to (the *test* database in pytest)."""
    engine = settings_dict["ENGINE"]
    if engine.endswith("sqlite3"):
        return f"sqlite:///{settings_dict['NAME']}"
    if "postgresql" in engine:
        user = settings_dict.get("USER") or "postgres"
        password = settings_dict.get("PASSWORD") or ""
        auth = f"{user}:{password}@" if password else f"{user}@"
        host = settings_dict.get("HOST") or "127.0.0.1"
        port = settings_dict.get("PORT") or 5432
        return f"postgres://{auth}{host}:{port}/{settings_dict['NAME']}"
    raise ClusterError(f"no DATABASE_URL form for engine {engine}")


@dataclass(eq=False)
class ManagedProcess:
    """A child process in its own process group, killed at exit if still alive."""

    args: list[str]
    env: dict[str, str]
    name: str
    log_path: Path | None = None
    popen: subprocess.Popen | None = field(default=None, init=False)
    _log: object = field(default=None, init=False, repr=False)

    def start(self) -> ManagedProcess:
        if self.alive:
            return self
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - closed in _reap
        self.popen = subprocess.Popen(
            self.args, cwd=BASE_DIR, env=self.env, start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def processes(self) -> list[psutil.Process]:
        """The main process and all its descendants still alive."""
        if not self.alive:
            return []
        try:
            main = psutil.Process(self.popen.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the whole process group: a host crash, nothing gets to clean up."""
        if self.popen is None:
            return
        pids = {p.pid for p in self.processes()}
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:  # a child that left the group still dies with its cluster
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(timeout=10)

    def terminate(self, *, timeout: float = 20.0) -> bool:
        """SIGTERM to the main pid only (django-q2's graceful stop: running work finishes).

        Returns False when it had to fall back to SIGKILL of the group after ``timeout``.
        """
        if not self.alive:
            self._reap(timeout=0)
            return True
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout=timeout)
            graceful = True
        except subprocess.TimeoutExpired:
            graceful = False
        # Whatever is left of the group (a wedged worker, django-q2 #23) is killed.
        self.kill()
        return graceful

    def _reap(self, *, timeout: float) -> None:
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if not self.alive:
            with _LIVE_LOCK:
                _LIVE.discard(self)


@dataclass(frozen=True)
class ClusterView:
    """One look at a cluster: its processes (by parentage, never by title) and its workers' reports.

    django-q2's tree is fixed: the ``qcluster`` main process forks one sentinel, which forks the
    workers, then the monitor, then the pusher (``Sentinel.spawn_cluster``), then starts guarding.
    A worker is a child of the sentinel that reported itself up (``observability.readiness``);
    the sentinel's other children are its monitor and pusher (and, for a moment, a worker forked
    but not yet reported).
    """

    processes: int  # live processes of the cluster, main included
    sentinel: psutil.Process | None
    workers: dict[int, tuple[psutil.Process, WorkerReport]]
    auxiliaries: list[psutil.Process]
    cpu_seconds: float  # of the main process: the only sign of life while it imports Django

    def ready(self, workers_expected: int) -> bool:
        return self.sentinel is not None and len(self.workers) >= workers_expected and len(self.auxiliaries) >= 2

    def milestones(self, workers_expected: int) -> int:
        """How far the start got: one per process forked and per worker reported, capped at a full
        cluster's count so a crash loop (processes dying and being forked again) never looks
        like progress past the best it reached."""
        return min(self.processes, 2 + workers_expected + 2) + min(len(self.workers), workers_expected)

    def describe(self, workers_expected: int) -> str:
        return (f"{self.processes} processes, sentinel {'up' if self.sentinel else 'missing'}, "
                f"{len(self.workers)}/{workers_expected} workers reported, {len(self.auxiliaries)}/2 monitor+pusher")


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _live_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [child for child in proc.children() if _live(child)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def wait_progressing(
    *,
    done: Callable[[], bool],
    progress: Callable[[], Any],
    stall_seconds: float,
    what: str,
    failed: Callable[[], str | None] = lambda: None,
    ceiling_seconds: float = WAIT_CEILING_SECONDS,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Wait until ``done()`` for as long as it is getting there: no fixed time is "long enough"
    on a loaded machine, a start that makes progress is waited for, one that stopped is not.

    ``progress()`` returns an orderable mark (a count, a tuple); a mark above the best seen so far
    is progress and restarts the ``stall_seconds`` clock, so a value that drops and comes back
    (a crash loop) is not. ``failed()`` returns a reason to stop at once (the process died).
    ``ceiling_seconds`` is only a safety net against a mark that grows forever.
    Raises ClusterError on a stall, a failure or the ceiling.
    """
    started = last_progress = time.monotonic()
    best = None
    while True:
        if done():
            return
        reason = failed()
        if reason:
            raise ClusterError(f"{what}: {reason}")
        mark = progress()
        now = time.monotonic()
        if best is None or mark > best:
            best, last_progress = mark, now
        elif now - last_progress > stall_seconds:
            raise ClusterError(f"{what}: no progress for {stall_seconds:.0f}s (at {best!r})")
        if now - started > ceiling_seconds:
            raise ClusterError(f"{what}: still not done after {ceiling_seconds:.0f}s although progressing")
        time.sleep(poll_seconds)


class QCluster(ManagedProcess):
    """One ``python manage.py qcluster`` with its own environment.

    Each start gets a fresh readiness directory (``PIPELINE_OPS_READINESS_DIR``) where its workers
    report themselves, so ``ready``, ``worker_processes`` and ``busy_workers`` ask the cluster
    rather than read process titles (whose padding depends on the checkout's path).
    """

    def __init__(self, *, env: dict[str, str], name: str = "cluster", log_path: Path | None = None):
        super().__init__(args=[sys.executable, "manage.py", "qcluster"], env=dict(env), name=name, log_path=log_path)
        self.workers_expected = int(env.get("Q_WORKERS", "2"))
        self.restarts = 0
        self.readiness_dir: Path | None = None

    def view(self) -> ClusterView:
        """What the cluster's process tree and its workers' reports say right now."""
        processes = self.processes()
        main = processes[0] if processes else None
        try:
            cpu = sum(main.cpu_times()[:2]) if main is not None else 0.0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            cpu = 0.0
        sentinels = _live_children(main) if main is not None else []
        sentinel = sentinels[0] if sentinels else None
        children = _live_children(sentinel) if sentinel is not None else []
        reports = readiness_reports(self.readiness_dir) if self.readiness_dir else {}
        workers, auxiliaries = {}, []
        for child in children:
            report = reports.get(child.pid)
            # The parent check makes a report left by a dead worker whose pid was reused not count.
            if report is not None and report.parent_pid == sentinel.pid:
                workers[child.pid] = (child, report)
            else:
                auxiliaries.append(child)
        return ClusterView(processes=sum(1 for p in processes if _live(p)), sentinel=sentinel, workers=workers,
                           auxiliaries=auxiliaries, cpu_seconds=cpu)

    def worker_processes(self) -> list[psutil.Process]:
        """The forked task workers that reported themselves up and still live."""
        return [proc for proc, _ in self.view().workers.values()]

    def busy_workers(self) -> dict[int, str]:
        """pid -> task name, for workers running a task right now (their own report)."""
        return {pid: report.task or "" for pid, (_, report) in self.view().workers.items() if report.state == BUSY}

    def ready(self) -> bool:
        return self.alive and self.view().ready(self.workers_expected)

    def start(self, *, wait: bool = True, timeout: float = STALL_SECONDS) -> QCluster:
        if not self.alive:
            self._fresh_readiness_dir()
        super().start()
        if wait:
            self.wait_ready(timeout=timeout)
        return self

    def wait_ready(self, *, timeout: float = STALL_SECONDS) -> None:
        """Wait while the cluster starts. ``timeout`` is the longest it may go without progress
        (a process forked, a worker reported, or, before the sentinel exists, the main process
        using CPU to import Django), not a total: a slow start on a busy machine is waited for.
        ClusterError at once if the cluster exits, after ``timeout`` s if it stopped progressing."""

        def progress() -> tuple[int, float]:
            view = self.view()
            # CPU time counts only while nothing was forked yet; after that, a busy process that
            # forks nothing new (a crash loop) is not getting closer to ready.
            return (view.milestones(self.workers_expected), view.cpu_seconds if view.sentinel is None else 0.0)

        def failed() -> str | None:
            if not self.alive:
                return f"exited with {self.popen.returncode} before it was ready (log: {self.log_path})"
            return None

        try:
            wait_progressing(done=self.ready, progress=progress, failed=failed, stall_seconds=timeout,
                             what=f"{self.name} not ready")
        except ClusterError as exc:
            raise ClusterError(f"{exc}; {self.view().describe(self.workers_expected)} (log: {self.log_path})") from None

    def kill_worker(self, pid: int) -> bool:
        """SIGKILL one worker of this cluster (its sentinel respawns it). False if not ours/alive."""
        if pid not in {p.pid for p in self.worker_processes()}:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def restart(self, *, wait: bool = True, timeout: float = STALL_SECONDS) -> QCluster:
        self.kill()
        self.restarts += 1
        return self.start(wait=wait, timeout=timeout)

    def _fresh_readiness_dir(self) -> None:
        # Outside the checkout on purpose (a short path), and new per start: reports of the
        # previous run's workers must not count for this one.
        self._drop_readiness_dir()
        self.readiness_dir = Path(tempfile.mkdtemp(prefix=f"q-ready-{os.getpid()}-"))
        self.env[READINESS_DIR_ENV] = str(self.readiness_dir)

    def _drop_readiness_dir(self) -> None:
        if self.readiness_dir is not None:
            shutil.rmtree(self.readiness_dir, ignore_errors=True)
            self.readiness_dir = None

    def _reap(self, *, timeout: float) -> None:
        super()._reap(timeout=timeout)
        if not self.alive:
            self._drop_readiness_dir()


def stop_all(processes: Iterable[ManagedProcess], *, timeout: float = 20.0) -> None:
    """Stop processes concurrently (graceful first), so N clusters do not cost N x timeout."""
    threads = [threading.Thread(target=p.terminate, kwargs={"timeout": timeout}) for p in processes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for proc in leftovers:
        proc.kill()
