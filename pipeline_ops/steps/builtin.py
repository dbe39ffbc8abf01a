"""Registers the built-in steps and their policies (overridable per step in settings)."""
from __future__ import annotations

from django.conf import settings

from idempotency.policy import RetryPolicy

from . import step_register
from .base import Step, is_transient
from .llm import llm
from .text import preprocess, sentiment, summarise

# Offline steps fail only on bad input (permanent) or a crash (a lease takeover): a couple of
# attempts is plenty.
_LOCAL = RetryPolicy(max_attempts=3, backoff_base_seconds=1.0, backoff_max_seconds=30.0, is_transient=is_transient)

step_register(Step(name="preprocess", func=preprocess, policy=_LOCAL, lease_seconds=30, timeout_seconds=30,
                   description="Unicode NFKC, control characters stripped, whitespace folded, length limit, language guess."))
step_register(Step(name="sentiment", func=sentiment, policy=_LOCAL, lease_seconds=30, timeout_seconds=30,
                   description="VADER sentiment scores and a label."))
step_register(Step(name="summarise", func=summarise, policy=_LOCAL, lease_seconds=30, timeout_seconds=30,
                   description="Offline extractive summary (the default pipeline needs no endpoint)."))
# The model call: providers throttle and stall, so more attempts and a longer backoff. The lease
# outlives the client's read timeout so a healthy call never loses its key mid-flight; the
# runner heartbeats anyway.
step_register(Step(
    name="llm", func=llm,
    policy=RetryPolicy(max_attempts=5, backoff_base_seconds=2.0, backoff_max_seconds=120.0, is_transient=is_transient),
    lease_seconds=float(settings.LLM_TIMEOUT_SECONDS) + 30.0,  # timeout: LLM_TIMEOUT_SECONDS, read per call
    description="OpenAI-compatible chat completion with the step's Idempotency-Key.",
))
