"""The ``llm`` step: one OpenAI-compatible ``POST {base}/v1/chat/completions`` with httpx.

Settings (environment variables of the same name): ``LLM_BASE_URL`` (required for this step),
``LLM_MODEL``, ``LLM_API_KEY``, ``LLM_CONNECT_TIMEOUT_SECONDS``, ``LLM_TIMEOUT_SECONDS``. Read at
call time, so ``override_settings`` works and nothing is built at import (django-q2 forks).

The step's idempotency key goes out as ``Idempotency-Key``: when a timed-out call is retried,
a provider that honours the header answers the first call again instead of billing twice.
"""
from __future__ import annotations

import time

import httpx
from django.conf import settings

from .base import OutcomeUnknownError, PermanentStepError, StepContext, TransientStepError

SYSTEM_PROMPT = "You are a careful analyst. Summarise the user's text in one or two sentences and say what its tone is."


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare for 429s; the policy's backoff applies instead


def build_messages(ctx: StepContext) -> list[dict]:
    text = ctx.text()
    mood = ctx.outputs.get("sentiment")
    hint = f"\n\n(Sentiment analysis says: {mood.get('label')}, compound {mood.get('compound')}.)" if isinstance(mood, dict) else ""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text + hint}]


def llm(ctx: StepContext) -> dict:
    base = (settings.LLM_BASE_URL or "").rstrip("/")
    if not base:
        raise PermanentStepError("LLM_BASE_URL is not set: the llm step has no endpoint to call")
    headers = {"Idempotency-Key": ctx.idempotency_key, "Content-Type": "application/json"}
    if settings.LLM_API_KEY:
        headers["Authorization"] = f"Bearer {settings.LLM_API_KEY}"
    body = {"model": settings.LLM_MODEL, "messages": build_messages(ctx), "temperature": 0}
    read_timeout = ctx.timeout_seconds or settings.LLM_TIMEOUT_SECONDS
    timeout = httpx.Timeout(read_timeout, connect=settings.LLM_CONNECT_TIMEOUT_SECONDS)
    ctx.details.update(model=settings.LLM_MODEL, idempotency_key=ctx.idempotency_key)
    started = time.monotonic()
    try:
        # A client per call: no socket survives a fork, and one connection per step is nothing
        # next to a model call's latency.
        with httpx.Client(timeout=timeout) as client:
            response = client.post(f"{base}/v1/chat/completions", json=body, headers=headers)
    except httpx.TimeoutException as exc:
        ctx.details["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            raise TransientStepError(f"could not connect to the model endpoint in time: {exc!r}") from exc
        raise OutcomeUnknownError(
            f"the model call timed out after {read_timeout}s; it may have been processed"
        ) from exc
    except httpx.TransportError as exc:
        ctx.details["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        raise TransientStepError(f"model endpoint unreachable: {type(exc).__name__}: {exc}") from exc
    ctx.details["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    ctx.details["http_status"] = response.status_code
    request_id = response.headers.get("x-request-id")
    if request_id:
        ctx.details["provider_request_id"] = request_id
    if response.status_code == 429:
        hint = _retry_after(response)
        raise TransientStepError(f"rate limited by the model endpoint (429, Retry-After {hint})", retry_after_seconds=hint)
    if response.status_code >= 500:
        raise TransientStepError(f"model endpoint error {response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        raise PermanentStepError(f"model endpoint refused the request ({response.status_code}): {response.text[:200]}")
    try:
        data = response.json()
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise PermanentStepError(f"the model endpoint's answer is not a chat completion: {response.text[:200]}") from exc
    usage = data.get("usage") or {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if isinstance(usage.get(name), int):
            ctx.details[name] = usage[name]
    return {
        "content": content,
        "model": data.get("model", settings.LLM_MODEL),
        "completion_id": data.get("id", ""),
        "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage},
    }
