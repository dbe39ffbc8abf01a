"""Worker readiness reports cost nothing where nobody asked for them (production)."""
from __future__ import annotations

from django_q.signals import post_execute_in_worker, post_spawn, pre_execute

from pipeline_ops.observability.readiness import READINESS_DIR_ENV, readiness_reports


def test_no_readiness_receiver_is_connected_when_the_environment_does_not_set_the_directory(monkeypatch):
    monkeypatch.delenv(READINESS_DIR_ENV, raising=False)
    for signal in (post_spawn, pre_execute, post_execute_in_worker):
        assert not [key for key, *_ in signal.receivers if "pipeline_ops.readiness" in str(key)]


def test_reports_skip_unreadable_files_when_a_worker_died_mid_write(tmp_path):
    (tmp_path / "worker-1.json").write_text('{"pid": 1, "parent_pid": 0, "state": "idle"}')
    (tmp_path / "worker-2.json").write_text('{"pid": 2, "par')  # never happens (os.replace), tolerated
    assert list(readiness_reports(tmp_path)) == [1]
