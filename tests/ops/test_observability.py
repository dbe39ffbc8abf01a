"""/metrics, /healthz and the JSON logs, on SQLite and PostgreSQL."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import time
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db.models import DurationField, ExpressionWrapper, F
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from idempotency.models import Attempt, IdempotencyRecord
from idempotency.states import AttemptStatus, RecordStatus
from pipeline_ops.models import PipelineInput, StepRun
from pipeline_ops.observability import metrics as metrics_module
from pipeline_ops.steps import Step, step_register, step_unregister
from pipeline_ops.observability.logging import (
    JsonFormatter,
    LogContextFilter,
    log_context,
    log_context_bind,
    log_context_isolated,
)
from pipeline_ops.tasks import step_run_execute_task
from idempotency.policy import NO_RETRY

from .conftest import submit

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def client():
    return Client(HTTP_HOST="localhost")


@pytest.fixture(autouse=True)
def no_foreign_heartbeats(monkeypatch):
    """Read heartbeats under a key no cluster writes to: a qcluster running on this machine for
    something else (a demo, another test run) must not turn an expected 503 into a 200."""
    import uuid

    from django_q.conf import Conf

    monkeypatch.setattr(Conf, "Q_STAT", f"django_q:ops-test-{uuid.uuid4().hex}:cluster")


def scrape(client) -> dict[str, dict[tuple, float]]:
    """/metrics parsed: sample name -> {sorted label items: value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- /metrics -----------------------------------------------------------------------------------


def test_metrics_match_the_database_when_steps_ran_failed_and_were_fenced(client, world):
    samples = scrape(client)

    for status in AttemptStatus.values:
        assert samples["pipeline_ops_attempts"][(("status", status),)] == Attempt.objects.filter(status=status).count()
    assert samples["pipeline_ops_attempts"][(("status", "SUCCEEDED"),)] == 4  # 3 preprocess + 1 API key
    assert samples["pipeline_ops_attempts"][(("status", "FAILED"),)] == 3
    fenced = Attempt.objects.filter(status=AttemptStatus.FENCED).count()
    assert fenced == 1
    assert samples["pipeline_ops_fenced_late_writes_total"][()] == fenced
    assert samples["pipeline_ops_idempotent_replays_total"][(("scope", "api"),)] == 1
    for status in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"):
        assert samples["pipeline_ops_inputs"][(("status", status),)] == PipelineInput.objects.filter(status=status).count()
    assert samples["pipeline_ops_step_runs"][(("status", "SUCCEEDED"), ("step", "preprocess"))] == 3
    assert samples["pipeline_ops_step_runs"][(("status", "FAILED"), ("step", "ops_boom"))] == 2
    # The next steps of the three inputs are on the queue (the table brokers: rows in the same database).
    assert samples["pipeline_ops_queue_depth"][(("broker", settings.PIPELINE_OPS_BROKER), ("state", "ready"))] >= 3
    assert samples["pipeline_ops_broker_up"][()] == 1
    assert samples["pipeline_ops_stuck_leases"][()] == 0
    assert samples["pipeline_ops_processing_keys"][()] == IdempotencyRecord.objects.filter(status=RecordStatus.PROCESSING).count()


def test_counters_never_go_backwards_when_the_purge_deletes_old_records(client, world):
    from datetime import timedelta

    from django.utils import timezone

    from idempotency.purge import records_purge

    before = scrape(client)
    records = IdempotencyRecord.objects.count()

    report = records_purge(now=timezone.now() + timedelta(days=30))

    assert report.deleted > 0 and IdempotencyRecord.objects.count() == records - report.deleted
    assert not Attempt.objects.filter(status=AttemptStatus.FENCED).exists()  # the fenced attempt's key went too
    after = scrape(client)
    for name in ("pipeline_ops_fenced_late_writes_total", "pipeline_ops_idempotent_replays_total"):
        assert after[name] == before[name], name
    assert after["pipeline_ops_fenced_late_writes_total"][()] == 1
    # A second purge with nothing left to delete adds nothing.
    records_purge(now=timezone.now() + timedelta(days=30))
    assert scrape(client)["pipeline_ops_fenced_late_writes_total"][()] == 1


def test_latency_histogram_counts_every_finished_step_attempt_when_scraped(client, world):
    samples = scrape(client)

    counts = samples["pipeline_ops_step_latency_seconds_count"]
    assert counts[(("step", "preprocess"),)] == 3
    assert counts[(("step", "ops_boom"),)] == 2
    assert counts[(("step", "ops_value"),)] == 1
    buckets = samples["pipeline_ops_step_latency_seconds_bucket"]
    assert buckets[(("le", "+Inf"), ("step", "preprocess"))] == 3
    duration = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    # Each cumulative bucket holds exactly the attempts whose recorded duration fits in it.
    seconds = [
        d.total_seconds() for d in Attempt.objects.filter(record__key__endswith=":preprocess", finished_at__isnull=False)
        .annotate(duration=duration).values_list("duration", flat=True)
    ]
    assert len(seconds) == 3
    assert [buckets[(("le", str(b)), ("step", "preprocess"))] for b in metrics_module.LATENCY_BUCKETS_SECONDS] == [
        sum(1 for s in seconds if s <= b) for b in metrics_module.LATENCY_BUCKETS_SECONDS
    ]
    assert samples["pipeline_ops_step_latency_seconds_sum"][(("step", "preprocess"),)] == pytest.approx(sum(seconds), abs=1e-3)


def test_stuck_leases_and_oldest_age_appear_when_a_lease_expired(client, world):
    from django.utils import timezone

    from idempotency import guard

    guard.claim(scope="step", key="stuck:1", operation="op", fingerprint="a" * 64, lease_seconds=1,
                now=timezone.now() - timedelta(minutes=10))

    samples = scrape(client)

    assert samples["pipeline_ops_stuck_leases"][()] == 1
    assert samples["pipeline_ops_oldest_processing_age_seconds"][()] == pytest.approx(600, abs=30)


def test_http_responses_are_counted_by_status_and_code_when_the_api_answers_409_and_422(client, django_user_model):
    """Real requests through the whole stack: a key held by a first request still in flight
    (409), and a key reused with another body (422)."""
    from idempotency import guard
    from idempotency.drf import request_fingerprint
    from pipeline_ops.services.tokens import api_token_create

    user = django_user_model.objects.create_user(username="metrics-409-422")
    auth = {"HTTP_AUTHORIZATION": f"Token {api_token_create(user=user)[1]}"}
    body = {"pipeline": "default", "payload": {"text": "held"}}
    # The first request holding "k-409" is still running (it claimed the key and has not finished).
    guard.claim(scope=f"api:{user.pk}", key="k-409", operation="POST /api/v1/inputs/",
                fingerprint=request_fingerprint(method="POST", path="/api/v1/inputs/", body=body), lease_seconds=60)
    before = scrape(client).get("pipeline_ops_http_responses_total", {})

    def post(key, payload):
        return client.post("/api/v1/inputs/", data=payload, content_type="application/json", HTTP_IDEMPOTENCY_KEY=key, **auth)

    conflicts = [post("k-409", body) for _ in range(2)]
    created = post("k-422", {"pipeline": "default", "payload": {"text": "first"}})
    reused = post("k-422", {"pipeline": "default", "payload": {"text": "second"}})
    after = scrape(client)["pipeline_ops_http_responses_total"]

    assert [r.status_code for r in conflicts] == [409, 409] and created.status_code == 201 and reused.status_code == 422
    key_409 = (("code", conflicts[0].json()["code"]), ("status", "409"))
    key_422 = (("code", reused.json()["code"]), ("status", "422"))
    assert key_409[0][1] == "idempotency_key_in_progress" and key_422[0][1] == "idempotency_key_reused"
    assert after[key_409] - before.get(key_409, 0) == 2
    assert after[key_422] - before.get(key_422, 0) == 1
    assert after[(("code", ""), ("status", "201"))] - before.get((("code", ""), ("status", "201")), 0) == 1


def test_api_conflict_is_counted_when_a_real_request_gets_one(client, django_user_model):
    """Through the whole stack: a POST without Idempotency-Key is a 400 with a stable code."""
    from pipeline_ops.services.tokens import api_token_create

    user = django_user_model.objects.create_user(username="metrics-client")
    _, token = api_token_create(user=user)
    before = scrape(client).get("pipeline_ops_http_responses_total", {})

    response = client.post("/api/v1/inputs/", data={"pipeline": "default", "payload": {"text": "x"}},
                           content_type="application/json", HTTP_AUTHORIZATION=f"Token {token}")
    code = response.json().get("code")
    assert response.status_code == 400 and code

    after = scrape(client)["pipeline_ops_http_responses_total"]
    key = (("code", code), ("status", "400"))
    assert after[key] - before.get(key, 0) == 1


def test_metrics_add_up_worker_files_when_prometheus_multiproc_dir_is_set(tmp_path, monkeypatch):
    """Two worker processes count into one directory; the scrape adds them up (gunicorn's shape)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "tests.settings"}
    count = (
        "from pipeline_ops.observability.metrics import HTTP_RESPONSES;"
        "HTTP_RESPONSES.labels(status='409', code='idempotency_key_in_progress').inc({n})"
    )
    workers = [subprocess.Popen([sys.executable, "-c", count.format(n=n)], cwd=ROOT, env=env) for n in (2, 3)]
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    out = metrics_module.metrics_exposition().decode()

    assert 'pipeline_ops_http_responses_total{code="idempotency_key_in_progress",status="409"} 5.0' in out
    assert "pipeline_ops_attempts" in out  # the database families follow the summed counters


# --- /healthz -----------------------------------------------------------------------------------


def test_healthz_is_503_with_detail_when_no_cluster_heartbeat_exists(client):
    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"]["ok"] is True and body["checks"]["broker"]["broker"] == settings.PIPELINE_OPS_BROKER
    assert body["checks"]["cluster"]["ok"] is False
    assert "no cluster heartbeat" in body["checks"]["cluster"]["error"]


def test_healthz_is_200_when_the_cluster_check_is_not_required(client, settings):
    settings.HEALTHZ_REQUIRE_CLUSTER = False

    response = client.get("/healthz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["cluster"] == {**body["checks"]["cluster"], "ok": False, "required": False}


def test_healthz_is_503_when_the_redis_broker_is_unreachable(client, settings):
    port = closed_port()
    settings.HEALTHZ_REQUIRE_CLUSTER = False
    settings.PIPELINE_OPS_BROKER = "redis"
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "redis": f"redis://user:secret@127.0.0.1:{port}/0"}

    response = client.get("/healthz")

    assert response.status_code == 503
    broker = response.json()["checks"]["broker"]
    assert broker["ok"] is False and broker["broker"] == "redis"
    assert "ConnectionError" in broker["error"] or "refused" in broker["error"].lower()
    assert response.json()["checks"]["database"]["ok"] is True
    assert "secret" not in response.content.decode()


def test_healthz_reports_the_redis_queue_when_redis_is_reachable(client, settings):
    import redis

    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pytest.fail("Redis on 127.0.0.1:6379 is part of the test environment (see the team brief)")
    settings.HEALTHZ_REQUIRE_CLUSTER = False
    settings.PIPELINE_OPS_BROKER = "redis"
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "redis": "redis://127.0.0.1:6379/0", "name": "pipeline_ops_ops_health"}

    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["checks"]["broker"] | {"seconds": 0} == {
        "ok": True, "required": True, "seconds": 0, "broker": "redis", "url": "redis://127.0.0.1:6379/0",
        "queue": "pipeline_ops_ops_health", "ready": 0,
    }


# --- structured logs ----------------------------------------------------------------------------


def _json_logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LogContextFilter())
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def test_json_log_line_carries_input_step_attempt_and_key_when_inside_a_context():
    logger, stream = _json_logger("tests.ops.json1")

    with log_context(input_id="7c0e", step="sentiment", key="7c0e:sentiment"):
        with log_context(attempt=2):
            logger.info("model answered in %d ms", 41, extra={"tokens": 12})
        logger.warning("outside the attempt")
    logger.error("no context")

    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first | {"ts": "", "pid": 0, "host": ""} == {
        "ts": "", "pid": 0, "host": "", "level": "INFO", "logger": "tests.ops.json1", "message": "model answered in 41 ms",
        "input_id": "7c0e", "step": "sentiment", "attempt": 2, "key": "7c0e:sentiment", "tokens": 12,
    }
    assert second["attempt"] is None and second["step"] == "sentiment"
    assert [third[f] for f in ("input_id", "step", "attempt", "key")] == [None, None, None, None]


def test_bound_fields_end_with_the_task_when_the_task_is_isolated():
    logger, stream = _json_logger("tests.ops.json2")

    @log_context_isolated
    def task(n):
        log_context_bind(input_id=f"input-{n}", step="preprocess", key=f"input-{n}:preprocess", attempt=1)
        try:
            raise RuntimeError("step crashed")
        except RuntimeError:
            logger.exception("attempt failed")

    task(1)
    logger.info("between tasks")

    failed, between = (json.loads(line) for line in stream.getvalue().splitlines())
    assert failed["input_id"] == "input-1" and failed["attempt"] == 1
    assert failed["exc_type"] == "RuntimeError" and "step crashed" in failed["traceback"]
    assert between["input_id"] is None


def test_log_format_json_setting_makes_every_project_log_line_json_when_set():
    code = (
        "import django, logging; django.setup();"
        "from pipeline_ops.observability.logging import log_context;"
        "ctx = log_context(input_id='abc', step='llm', attempt=3, key='abc:llm'); ctx.__enter__();"
        "logging.getLogger('pipeline_ops.runner').warning('late answer fenced')"
    )
    env = {**os.environ, "LOG_FORMAT": "json", "DJANGO_SETTINGS_MODULE": "tests.settings", "PIPELINE_OPS_HOST": "host-a"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert (line["message"], line["input_id"], line["step"], line["attempt"], line["key"], line["level"], line["host"]) == (
        "late answer fenced", "abc", "llm", 3, "abc:llm", "WARNING", "host-a",
    )


# --- /healthz with a real cluster (ORM broker: heartbeats through the shared stats cache) ---------


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_healthz_is_200_while_a_real_cluster_beats_and_503_after_it_is_killed(client, monkeypatch, settings):
    from django.db import connection
    from django_q.conf import Conf

    from pipeline_ops.chaos.brokers import queue_name_for, use_broker
    from pipeline_ops.chaos.cluster import STALL_SECONDS, ClusterError, QCluster, base_env, database_url_for, wait_progressing

    queue = queue_name_for(settings.TEST_DB_TAG, "health")
    monkeypatch.setattr(Conf, "Q_STAT", f"django_q:{queue}:cluster")
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "name": queue}
    cluster = QCluster(
        env=base_env(
            DJANGO_SETTINGS_MODULE="tests.settings", DATABASE_URL=database_url_for(connection.settings_dict),
            SECRET_KEY=settings.SECRET_KEY, PIPELINE_OPS_BROKER=settings.PIPELINE_OPS_BROKER, PIPELINE_OPS_QUEUE=queue, Q_WORKERS=1,
            Q_LOG_LEVEL="ERROR", LOG_LEVEL="ERROR",
        ),
        name="health", log_path=Path(settings.VAR_DIR) / "test-logs" / f"ops-health-{settings.TEST_DB_TAG}.log",
    )
    try:
        with use_broker(kind=settings.PIPELINE_OPS_BROKER, queue=queue):
            cluster.start(wait=True)
            answers = []

            def beating() -> bool:  # the first heartbeat follows the first guard cycle
                answers.append(client.get("/healthz"))
                return answers[-1].status_code == 200

            # Fails at once if the cluster died; a live cluster that never beats is a stall.
            with contextlib.suppress(ClusterError):
                wait_progressing(done=beating, progress=lambda: 0, stall_seconds=STALL_SECONDS, what="first heartbeat",
                                 failed=lambda: None if cluster.alive else "the cluster died", poll_seconds=0.3)
            alive = answers[-1]
            cluster.kill()
            time.sleep(3.5)  # a heartbeat expires 3 s after the last one
            dead = client.get("/healthz")
    finally:
        cluster.kill()

    assert alive.status_code == 200, alive.content
    checks = alive.json()["checks"]
    assert checks["cluster"]["clusters"] == 1 and checks["cluster"]["workers"] == 1
    assert 0 <= checks["cluster"]["last_heartbeat_age_seconds"] <= 3.5
    assert checks["broker"] | {"seconds": 0, "ready": 0} == {
        "ok": True, "required": True, "seconds": 0, "broker": settings.PIPELINE_OPS_BROKER, "database": "default", "queue": queue,
        "ready": 0,
    }
    assert dead.status_code == 503
    assert "no cluster heartbeat" in dead.json()["checks"]["cluster"]["error"]


def test_runner_log_lines_carry_input_step_attempt_and_key_when_a_step_logs(settings):
    logger, stream = _json_logger("tests.ops.runner_step")

    def chatty(ctx):
        logger.warning("calling the model")
        return {"ok": True}

    settings.PIPELINES = {**settings.PIPELINES, "ops_chatty": {"description": "test-only", "steps": ["ops_chatty"]}}
    step_register(Step(name="ops_chatty", func=chatty, policy=NO_RETRY, lease_seconds=30, timeout_seconds=30), replace_existing=True)
    try:
        [pipeline_input] = submit("ops_chatty", [{"text": "hello"}])
        step_run = StepRun.objects.get(input=pipeline_input)
        assert step_run_execute_task(step_run.pk) == "succeeded"
        logger.warning("after the task")
    finally:
        step_unregister(name="ops_chatty")

    inside, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert [inside[f] for f in ("input_id", "step", "attempt", "key")] == [
        str(pipeline_input.pk), "ops_chatty", 1, f"{pipeline_input.pk}:ops_chatty",
    ]
    assert [after[f] for f in ("input_id", "step", "attempt", "key")] == [None, None, None, None]
