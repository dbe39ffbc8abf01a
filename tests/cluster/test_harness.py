"""The qcluster harness itself: a real cluster on the test database, started, SIGKILLed and stopped."""
from __future__ import annotations

import time

import psutil
import pytest
from django.db import connection

from pipeline_ops.chaos.brokers import queue_name_for
from pipeline_ops.chaos.cluster import QCluster, base_env, database_url_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_worker_respawned_and_group_gone_when_worker_sigkilled_then_cluster_killed(tmp_path):
    from django.conf import settings

    env = base_env(DATABASE_URL=database_url_for(connection.settings_dict), SECRET_KEY=settings.SECRET_KEY,
                   PIPELINE_OPS_QUEUE=queue_name_for(settings.TEST_DB_TAG, "harness"), Q_WORKERS=2)
    cluster = QCluster(env=env, name="harness", log_path=tmp_path / "harness.log")
    try:
        cluster.start(wait=True, timeout=60)
        workers = {p.pid for p in cluster.worker_processes()}
        assert len(workers) == 2 and cluster.ready()
        victim = next(iter(workers))
        assert cluster.kill_worker(victim)
        assert not cluster.kill_worker(1)  # not one of its workers: refused
        # django-q2's sentinel notices the dead worker and forks a new one.
        assert _wait(lambda: len(cluster.worker_processes()) == 2 and victim not in {p.pid for p in cluster.worker_processes()})
        group = [p.pid for p in cluster.processes()]
        cluster.kill()  # a host crash: the whole process group at once
        assert not cluster.alive
        assert _wait(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                                     for pid in group), timeout=10)
        cluster.restart(wait=True, timeout=60)
        assert cluster.restarts == 1 and cluster.ready()
        assert cluster.terminate(timeout=20)  # SIGTERM to the main pid: a graceful stop
        assert not cluster.alive
    finally:
        cluster.kill()
