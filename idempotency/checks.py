"""System checks of the app's settings: a wrong retention is reported at start, not at 3 a.m.
when the purge runs. A warning, not an error: only the purge needs the retentions (and refuses
to run with them wrong); the workers and the web must not stop for it."""
from __future__ import annotations

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from . import conf


@checks.register()
def retention_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    try:
        conf.retention_hours()
    except ImproperlyConfigured as exc:
        return [checks.Warning(str(exc), id="idempotency.W001")]
    return []
