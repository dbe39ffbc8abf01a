"""A real ``qcluster`` on the PostgreSQL broker (pipeline_ops.pg_broker) runs pipelines end to end.

The cluster's ``poll`` is an hour: every hand-off (the first step from the submission, each next
step from the completion that enqueued it) reaches the idle pusher through its NOTIFY, or the
test stalls. The inputs are submitted in bulk (one INSERT and one NOTIFY for the batch) and one
by one (one enqueue each), both in the submitting transaction."""
from __future__ import annotations

import pytest
from django.db import connection
from django_q.models import OrmQ

from pipeline_ops.chaos.brokers import queue_name_for, use_broker
from pipeline_ops.chaos.cluster import STALL_SECONDS, QCluster, base_env, database_url_for, wait_progressing
from pipeline_ops.models import PipelineInput, StepOutput, StepRun
from pipeline_ops.pg_broker import notify_channel
from pipeline_ops.states import InputStatus, StepStatus

pytestmark = [pytest.mark.cluster, pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_pipelines_run_end_to_end_when_a_real_cluster_waits_on_notify_with_an_hour_of_poll(tmp_path, settings):
    from pipeline_ops.services.inputs import input_submit

    queue = queue_name_for(settings.TEST_DB_TAG, "pg-broker")
    cluster = QCluster(
        env=base_env(
            DJANGO_SETTINGS_MODULE="tests.settings", DATABASE_URL=database_url_for(connection.settings_dict),
            SECRET_KEY=settings.SECRET_KEY, PIPELINE_OPS_BROKER="postgres", PIPELINE_OPS_QUEUE=queue, Q_WORKERS=2,
            Q_POLL=3600, Q_LOG_LEVEL="WARNING", LOG_LEVEL="WARNING",
        ),
        name="pg-broker", log_path=tmp_path / "pg-broker.log",
    )
    try:
        with use_broker(kind="postgres", queue=queue):
            cluster.start(wait=True)
            for n in range(6):
                input_submit(pipeline="default", payload={"text": f"A calm and happy report number {n}."},
                             scope="pg-broker-test", key=f"k{n}")
            inputs = PipelineInput.objects.filter(submission_scope="pg-broker-test")
            queued = OrmQ.objects.filter(key=queue)
            succeeded = StepRun.objects.filter(input__in=inputs, status=StepStatus.SUCCEEDED)
            wait_progressing(
                # ... and every message acknowledged (django-q2's monitor acks after the completion).
                done=lambda: inputs.filter(status=InputStatus.SUCCEEDED).count() == 6 and not queued.exists(),
                progress=succeeded.count, stall_seconds=STALL_SECONDS, what="6 inputs through 3 steps",
                failed=lambda: None if cluster.alive else "the cluster died",
            )
    finally:
        with connection.cursor() as cursor:  # wake the pusher so its process can go
            cursor.execute("SELECT pg_notify(%s, '')", [notify_channel(queue)])
        cluster.kill()
    assert succeeded.count() == 18
    assert StepOutput.objects.filter(input__in=inputs).count() == 18
