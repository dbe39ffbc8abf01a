"""The fault-injecting model server over real HTTP: the contract the chaos run relies on."""
from __future__ import annotations

import httpx
import pytest

from pipeline_ops.model_server import ModelServer

BODY = {"model": "m", "messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture
def server():
    with ModelServer(seed=1) as running:
        yield running


def post(server, key="", timeout=5.0, **kwargs):
    headers = {"Idempotency-Key": key} if key else {}
    return httpx.post(f"{server.url}/v1/chat/completions", json=BODY, headers=headers, timeout=timeout, **kwargs)


def test_answers_a_deterministic_completion_with_usage_when_healthy(server):
    first, second = post(server, "a").json(), post(server, "b").json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["usage"]["total_tokens"] == first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] > 0
    assert first["id"] != second["id"]


def test_counts_calls_per_key_and_replays_first_answer_when_honouring_keys(server):
    server.configure(honour_keys=True)
    first = post(server, "k").json()
    again = post(server, "k")
    post(server)  # no key: counted in the total only

    assert again.headers["Idempotent-Replayed"] == "true" and again.json()["id"] == first["id"]
    assert server.calls_by_key() == {"k": 2}
    stats = httpx.get(f"{server.url}/_stats").json()
    assert stats["total_calls"] == 3 and stats["distinct_keys"] == 1 and stats["processed"] == 2 and stats["replayed"] == 1


def test_new_answer_each_time_when_not_honouring_keys(server):
    assert post(server, "k").json()["id"] != post(server, "k").json()["id"]


def test_rate_limits_with_retry_after_when_configured_over_http(server):
    knobs = httpx.post(f"{server.url}/_config", json={"rate_429": 1.0, "retry_after": 7}).json()
    assert knobs["rate_429"] == 1.0
    response = post(server, "k")
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"


def test_answers_500_when_error_rate_is_one(server):
    server.configure(error_rate=1.0)
    assert post(server, "k").status_code == 500


def test_processes_then_stalls_past_client_timeout_when_stalling(server):
    server.configure(stall_rate=1.0, stall_seconds=5)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "slow", timeout=0.3)
    stats = server.stats()
    assert stats["calls_by_key"] == {"slow": 1} and stats["processed"] == 1 and stats["stalls"] == 1


def test_refuses_unknown_knob_when_configured_over_http(server):
    response = httpx.post(f"{server.url}/_config", json={"nonsense": 1})
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_knob"
    with pytest.raises(ValueError):
        server.configure(error_rate=1.5)


def test_reset_zeroes_counters(server):
    post(server, "k")
    assert httpx.post(f"{server.url}/_reset").json()["total_calls"] == 0
    assert server.calls_by_key() == {}


def test_same_seed_gives_same_fault_pattern():
    patterns = []
    for _ in range(2):
        with ModelServer(seed=42, error_rate=0.5) as s:
            patterns.append([post(s).status_code for _ in range(12)])
    assert patterns[0] == patterns[1] and set(patterns[0]) == {200, 500}


def test_command_serves_until_sigterm_when_started_as_a_subprocess():
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "model_server", "--port", "0", "--error-rate", "1", "--seed", "3"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "pipeline_ops.settings"},
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("model server listening on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.rsplit(" ", 1)[1]
        assert httpx.post(f"{url}/v1/chat/completions", json=BODY, headers={"Idempotency-Key": "x"}).status_code == 500
        assert httpx.get(f"{url}/_stats").json()["calls_by_key"] == {"x": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "1 calls, 1 distinct keys" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
