"""Pipelines as declared in ``settings.PIPELINES``: an ordered list of named steps each."""
from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from .errors import UnknownPipelineError


@dataclass(frozen=True)
class Pipeline:
    name: str
    steps: tuple[str, ...]
    description: str = ""


def pipeline_list() -> list[Pipeline]:
    return [
        Pipeline(name=name, steps=tuple(spec["steps"]), description=spec.get("description", ""))
        for name, spec in settings.PIPELINES.items()
    ]


def pipeline_get(*, name: str) -> Pipeline:
    """Raises UnknownPipelineError."""
    spec = settings.PIPELINES.get(name)
    if spec is None:
        known = ", ".join(sorted(settings.PIPELINES)) or "none"
        raise UnknownPipelineError(f"Unknown pipeline {name!r}; declared pipelines: {known}.")
    return Pipeline(name=name, steps=tuple(spec["steps"]), description=spec.get("description", ""))
