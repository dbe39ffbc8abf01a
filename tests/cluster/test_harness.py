"""The qcluster harness itself: a real cluster on the test database, started, SIGKILLed and stopped.

Readiness and busy workers come from the workers' own reports (pipeline_ops.observability.readiness),
never from process titles; every wait follows the cluster's progress instead of a fixed time."""
from __future__ import annotations

import psutil
import pytest
from django.db import connection
from django_q.models import OrmQ
from django_q.tasks import async_task

from pipeline_ops.chaos.brokers import queue_name_for, use_broker
from pipeline_ops.chaos.cluster import STALL_SECONDS, ClusterError, QCluster, base_env, database_url_for, wait_progressing

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _cluster(tmp_path, purpose: str, **env) -> QCluster:
    from django.conf import settings

    env = base_env(DATABASE_URL=database_url_for(connection.settings_dict), SECRET_KEY=settings.SECRET_KEY,
                   PIPELINE_OPS_QUEUE=queue_name_for(settings.TEST_DB_TAG, purpose), Q_WORKERS=2, **env)
    return QCluster(env=env, name=purpose, log_path=tmp_path / f"{purpose}.log")


def _alive(pids) -> int:
    def live(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return sum(1 for pid in pids if live(pid))


def test_worker_respawned_and_group_gone_when_worker_sigkilled_then_cluster_killed(tmp_path):
    cluster = _cluster(tmp_path, "harness")
    try:
        cluster.start(wait=True)
        workers = {p.pid for p in cluster.worker_processes()}
        assert len(workers) == 2 and cluster.ready()
        victim = next(iter(workers))
        assert cluster.kill_worker(victim)
        assert not cluster.kill_worker(1)  # not one of its workers: refused
        # django-q2's sentinel notices the dead worker and forks a new one, which reports itself.
        wait_progressing(
            done=lambda: victim not in {p.pid for p in cluster.worker_processes()} and cluster.ready(),
            progress=lambda: (victim not in {p.pid for p in cluster.worker_processes()},
                              cluster.view().milestones(cluster.workers_expected)),
            stall_seconds=STALL_SECONDS, what="worker respawn",
        )
        group = [p.pid for p in cluster.processes()]
        cluster.kill()  # a host crash: the whole process group at once
        assert not cluster.alive
        wait_progressing(done=lambda: _alive(group) == 0, progress=lambda: -_alive(group),
                         stall_seconds=STALL_SECONDS, what="killed group gone")
        cluster.restart(wait=True)
        assert cluster.restarts == 1 and cluster.ready()
        assert cluster.terminate(timeout=20)  # SIGTERM to the main pid: a graceful stop
        assert not cluster.alive
    finally:
        cluster.kill()


def test_busy_workers_names_the_running_task_when_a_worker_runs_one(tmp_path):
    from django.conf import settings

    release = tmp_path / "release"
    cluster = _cluster(tmp_path, "harness-busy")
    try:
        cluster.start(wait=True)
        assert cluster.busy_workers() == {}
        with use_broker(kind=settings.PIPELINE_OPS_BROKER, queue=queue_name_for(settings.TEST_DB_TAG, "harness-busy")):
            async_task("tests.cluster.helpers.hold_until", str(release), task_name="harness-hold")

        def stage() -> int:  # queued (0) -> taken by the pusher (1) -> a worker reports it busy (2)
            if "harness-hold" in cluster.busy_workers().values():
                return 2
            return 1 if not OrmQ.objects.filter(lock__isnull=True).exists() else 0

        wait_progressing(done=lambda: stage() == 2, progress=stage, stall_seconds=STALL_SECONDS, what="task picked up")
        busy = cluster.busy_workers()
        assert list(busy.values()) == ["harness-hold"]
        assert set(busy) <= {p.pid for p in cluster.worker_processes()}
        release.touch()  # the task returns; its worker says idle again
        wait_progressing(done=lambda: cluster.busy_workers() == {}, progress=lambda: 0,
                         stall_seconds=STALL_SECONDS, what="worker idle again")
    finally:
        cluster.kill()


def test_wait_ready_fails_at_once_when_the_cluster_exits_while_starting(tmp_path):
    # A broker that cannot exist: the sentinel's first ping fails and qcluster exits. The wait
    # must say so as soon as the process is gone, not after a stall window.
    cluster = _cluster(tmp_path, "harness-dead", PIPELINE_OPS_BROKER="nonsense")
    with pytest.raises(ClusterError, match="exited with"):
        cluster.start(wait=True, timeout=600)
    assert not cluster.alive


def test_wait_ready_fails_after_the_stall_window_when_the_cluster_stops_making_progress(tmp_path):
    # A "Redis" that accepts connections and never answers: the cluster hangs on its first PING,
    # alive but going nowhere. The wait gives up once nothing moved for its stall window.
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        cluster = _cluster(tmp_path, "harness-stuck", PIPELINE_OPS_BROKER="redis", REDIS_URL=f"redis://127.0.0.1:{port}/0")
        try:
            with pytest.raises(ClusterError, match="no progress for 5s"):
                cluster.start(wait=True, timeout=5)
            assert cluster.alive  # stuck, not dead: that is what the stall window is for
        finally:
            cluster.kill()
