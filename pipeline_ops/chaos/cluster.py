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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BASE_DIR = Path(__file__).resolve().parent.parent.parent

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


class QCluster(ManagedProcess):
    """One ``python manage.py qcluster`` with its own environment."""

    def __init__(self, *, env: dict[str, str], name: str = "cluster", log_path: Path | None = None):
        super().__init__(args=[sys.executable, "manage.py", "qcluster"], env=env, name=name, log_path=log_path)
        self.workers_expected = int(env.get("Q_WORKERS", "2"))
        self.restarts = 0

    def _titled(self) -> list[tuple[psutil.Process, str]]:
        out = []
        for proc in self.processes():
            try:
                out.append((proc, " ".join(proc.cmdline())))
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        return out

    def worker_processes(self) -> list[psutil.Process]:
        """The forked task workers (setproctitle: 'qcluster <name> idle|processing ...')."""
        return [p for p, title in self._titled() if title.endswith(" idle") or " processing " in title]

    def busy_workers(self) -> dict[int, str]:
        """pid -> task name, for workers running a task right now."""
        busy = {}
        for proc, title in self._titled():
            if " processing " in title:
                busy[proc.pid] = title.split(" processing ", 1)[1].split(" ", 1)[0]
        return busy

    def ready(self) -> bool:
        titles = [title for _, title in self._titled()]
        return (
            sum(1 for t in titles if t.endswith(" pusher")) == 1
            and sum(1 for t in titles if t.endswith(" monitor")) == 1
            and len(self.worker_processes()) >= self.workers_expected
        )

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> QCluster:
        super().start()
        if wait:
            self.wait_ready(timeout=timeout)
        return self

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise ClusterError(f"{self.name} exited with {self.popen.returncode} before it was ready (log: {self.log_path})")
            if self.ready():
                return
            time.sleep(0.1)
        raise ClusterError(f"{self.name} not ready after {timeout:.0f}s (log: {self.log_path})")

    def kill_worker(self, pid: int) -> bool:
        """SIGKILL one worker of this cluster (its sentinel respawns it). False if not ours/alive."""
        if pid not in {p.pid for p in self.worker_processes()}:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def restart(self, *, wait: bool = True, timeout: float = 60.0) -> QCluster:
        self.kill()
        self.restarts += 1
        return self.start(wait=wait, timeout=timeout)


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
