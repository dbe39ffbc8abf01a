"""A fault-injecting, OpenAI-compatible model server: a real threaded HTTP server on 127.0.0.1.

Tests, the chaos run and the demo point ``LLM_BASE_URL`` at it. It answers
``POST /v1/chat/completions`` with a deterministic completion and ``usage`` token counts, and
injects the faults that real providers produce:

* ``latency_ms``: added to every answer;
* ``error_rate``: share of calls answered 500;
* ``rate_429`` (+ ``retry_after`` seconds): share answered 429 with ``Retry-After``;
* ``stall_rate`` + ``stall_seconds``: the incident. The call is processed and counted (and its
  answer stored), then the server stalls past the client's timeout before answering;
* ``honour_keys``: a repeated ``Idempotency-Key`` gets the first answer again, fault-free;
* ``seed``: makes the fault draws reproducible.

It counts the calls it received per Idempotency-Key. In-process use:
``ModelServer(port=0, stall_rate=1, stall_seconds=5).start()``, ``.url``, ``.calls_by_key()``,
``.configure(**knobs)``, ``.stop()``. Across processes: ``GET /_stats`` (JSON counters),
``POST /_config`` (JSON knobs, answers the knobs in force) and ``POST /_reset`` (zero the counters).
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Knobs:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    rate_429: float = 0.0
    retry_after: float = 1.0
    stall_rate: float = 0.0
    stall_seconds: float = 0.0
    honour_keys: bool = False
    seed: int | None = None

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def validate(self) -> None:
        for name in ("error_rate", "rate_429", "stall_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}")
        for name in ("latency_ms", "retry_after", "stall_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


def completion_for(messages: list[dict], model: str) -> dict:
    """The deterministic answer to ``messages``: same request, same content and token counts."""
    user = " ".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    words = user.split()
    content = f"Summary ({digest}): " + " ".join(words[:24]) + (" …" if len(words) > 24 else "")
    completion_tokens = len(content.split())
    return {
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_words, "completion_tokens": completion_tokens, "total_tokens": prompt_words + completion_tokens},
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "ModelServer"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet: tests and chaos read /_stats)
        pass

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): exactly what a stall is for

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw or b"{}")

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") == "/_stats":
            self._json(200, self.server.owner.stats())
        elif self.path.rstrip("/") in ("", "/health"):
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "code": "not_found"}})

    def do_POST(self) -> None:  # noqa: N802
        owner = self.server.owner
        path = self.path.rstrip("/")
        try:
            body = self._body()
        except ValueError:
            self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error", "code": "invalid_json"}})
            return
        if path == "/_config":
            try:
                self._json(200, owner.configure(**(body or {})))
            except (TypeError, ValueError) as exc:
                self._json(400, {"error": {"message": str(exc), "type": "invalid_request_error", "code": "bad_knob"}})
            return
        if path == "/_reset":
            owner.reset()
            self._json(200, owner.stats())
            return
        if path != "/v1/chat/completions":
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found", "code": "not_found"}})
            return
        status, answer, headers, stall = owner._handle(self.headers.get("Idempotency-Key", ""), body)
        if stall:
            owner._stop.wait(stall)
        self._json(status, answer, headers)


class ModelServer:
    """The fault-injecting server; ``port=0`` picks a free port (read it back from ``url``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **knobs: Any):
        self.host, self.port = host, port
        self.knobs = Knobs()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.configure(**knobs)
        self.reset()

    # --- control ---------------------------------------------------------------------------

    def configure(self, **knobs: Any) -> dict:
        """Change knobs (unknown names raise TypeError, bad values ValueError); returns them all."""
        unknown = set(knobs) - Knobs.names()
        if unknown:
            raise TypeError(f"unknown knob(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(Knobs.names()))}")
        with self._lock:
            candidate = Knobs(**{**asdict(self.knobs), **knobs})
            for name in ("latency_ms", "error_rate", "rate_429", "retry_after", "stall_rate", "stall_seconds"):
                setattr(candidate, name, float(getattr(candidate, name)))
            candidate.honour_keys = bool(candidate.honour_keys)
            candidate.validate()
            self.knobs = candidate
            if "seed" in knobs or not hasattr(self, "_rng"):
                self._rng = random.Random(candidate.seed)
            return asdict(self.knobs)

    def reset(self) -> None:
        """Zero the counters and forget stored answers."""
        with self._lock:
            self._calls: Counter[str] = Counter()
            self._answers: dict[str, dict] = {}
            self._total = 0
            self._counts = Counter()

    def start(self) -> "ModelServer":
        self._stop.clear()
        self._httpd = _Server((self.host, self.port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"model-server:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases stalled handlers
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None and thread is not None:
            httpd.shutdown()
            thread.join(timeout=5)
            httpd.server_close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- counters --------------------------------------------------------------------------

    def calls_by_key(self) -> dict[str, int]:
        """Calls received per Idempotency-Key (calls without a key are only in the total)."""
        with self._lock:
            return dict(self._calls)

    def stats(self) -> dict:
        with self._lock:
            return {
                "total_calls": self._total,
                "distinct_keys": len(self._calls),
                "calls_by_key": dict(self._calls),
                "duplicate_calls": sum(n - 1 for n in self._calls.values()),
                "processed": self._counts["processed"],
                "replayed": self._counts["replayed"],
                "errors_500": self._counts["errors_500"],
                "errors_429": self._counts["errors_429"],
                "stalls": self._counts["stalls"],
                "knobs": asdict(self.knobs),
            }

    # --- one call ----------------------------------------------------------------------------

    def _handle(self, key: str, body: Any) -> tuple[int, dict, dict[str, str], float]:
        """Decide the answer under the lock; the caller sleeps (latency, stall) outside it."""
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return 400, {"error": {"message": "'messages' must be a list", "type": "invalid_request_error", "code": "invalid_messages"}}, {}, 0.0
        with self._lock:
            knobs = self.knobs
            self._total += 1
            if key:
                self._calls[key] += 1
            if key and knobs.honour_keys and key in self._answers:
                self._counts["replayed"] += 1
                return 200, self._answers[key], {"Idempotent-Replayed": "true"}, knobs.latency_ms / 1000
            draw = self._rng.random()
            if draw < knobs.rate_429:
                self._counts["errors_429"] += 1
                return 429, {"error": {"message": "rate limited", "type": "rate_limit_error", "code": "rate_limited"}}, {
                    "Retry-After": f"{knobs.retry_after:g}"}, knobs.latency_ms / 1000
            if draw < knobs.rate_429 + knobs.error_rate:
                self._counts["errors_500"] += 1
                return 500, {"error": {"message": "injected server error", "type": "server_error", "code": "internal_error"}}, {}, knobs.latency_ms / 1000
            answer = completion_for(body["messages"], str(body.get("model") or "model-server"))
            answer["id"] = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            answer["created"] = int(time.time())
            self._counts["processed"] += 1
            if key and key not in self._answers:
                self._answers[key] = answer
            stall = self._rng.random() < knobs.stall_rate
            if stall:
                # The incident: the work is done and counted, the answer comes too late.
                self._counts["stalls"] += 1
            return 200, answer, {"x-request-id": answer["id"]}, knobs.latency_ms / 1000 + (knobs.stall_seconds if stall else 0.0)
