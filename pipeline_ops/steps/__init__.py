"""The step registry: name -> Step (callable + policy). Pipelines in settings refer to these names.

Built-in steps register themselves on import. A project (or a test) adds its own with
``step_register``. Per-step policy overrides come from ``settings.PIPELINE_STEP_POLICIES``
(read on every ``step_get``, so ``override_settings`` works), e.g.
``{"llm": {"max_attempts": 8, "backoff_base_seconds": 2, "lease_seconds": 90}}``.
"""
from __future__ import annotations

from dataclasses import replace

from django.conf import settings

from idempotency.policy import RetryPolicy

from ..errors import PipelineOpsError
from .base import (
    OutcomeUnknownError,
    PermanentStepError,
    Step,
    StepCallable,
    StepContext,
    StepError,
    StepStoppedError,
    TransientStepError,
    is_outcome_unknown,
    is_transient,
)

__all__ = [
    "OutcomeUnknownError", "PermanentStepError", "Step", "StepCallable", "StepContext", "StepError",
    "StepStoppedError", "TransientStepError", "UnknownStepError", "is_outcome_unknown", "is_transient",
    "step_get", "step_list", "step_register", "step_unregister",
]

_POLICY_FIELDS = {"max_attempts", "backoff_base_seconds", "backoff_max_seconds", "jitter"}
_STEP_FIELDS = {"lease_seconds", "timeout_seconds"}

_REGISTRY: dict[str, Step] = {}


class UnknownStepError(PipelineOpsError):
    status_code = 400
    code = "unknown_step"
    default_message = "No step of that name is registered."


def step_register(step: Step, *, replace_existing: bool = False) -> Step:
    """Add ``step`` to the registry. Raises ValueError if the name is taken (unless replacing)."""
    if step.name in _REGISTRY and not replace_existing:
        raise ValueError(f"a step named {step.name!r} is already registered")
    _REGISTRY[step.name] = step
    return step


def step_unregister(*, name: str) -> None:
    _REGISTRY.pop(name, None)


def step_get(*, name: str) -> Step:
    """The registered step with the settings' policy overrides applied. Raises UnknownStepError."""
    _load_builtins()
    step = _REGISTRY.get(name)
    if step is None:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownStepError(f"Unknown step {name!r}; registered steps: {known}.")
    overrides = getattr(settings, "PIPELINE_STEP_POLICIES", {}).get(name) or {}
    unknown = set(overrides) - _POLICY_FIELDS - _STEP_FIELDS
    if unknown:
        raise UnknownStepError(f"PIPELINE_STEP_POLICIES[{name!r}] has unknown keys: {', '.join(sorted(unknown))}.")
    if not overrides:
        return step
    policy_changes = {k: v for k, v in overrides.items() if k in _POLICY_FIELDS}
    step_changes = {k: float(v) for k, v in overrides.items() if k in _STEP_FIELDS}
    policy: RetryPolicy = replace(step.policy, **policy_changes) if policy_changes else step.policy
    return replace(step, policy=policy, **step_changes)


def step_list() -> list[Step]:
    _load_builtins()
    return [step_get(name=name) for name in sorted(_REGISTRY)]


_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from . import builtin  # noqa: F401  (registers preprocess, sentiment, summarise, llm)
