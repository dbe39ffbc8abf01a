"""``/healthz``: is this deployment able to do its work right now?

Three checks, each with its own JSON detail and timing:

* ``database``: a ``SELECT 1`` on the default database;
* ``broker``: the django-q2 queue answers (ORM broker: its table is readable; Redis: PING on the
  configured URL, with short timeouts so a dead Redis answers 503 in about a second, not never);
* ``cluster``: the freshest django-q2 cluster heartbeat (``Stat``) is younger than
  ``HEALTHZ_CLUSTER_MAX_AGE_SECONDS``. A cluster writes one every guard cycle (0.5 s) with a
  3 s expiry, to Redis with the Redis broker and to the ``Q_CLUSTER["cache"]`` cache with the
  ORM broker; "none seen" means no cluster is running (or wedged before its guard loop).
  ``HEALTHZ_REQUIRE_CLUSTER=0`` reports it without failing (e.g. a web-only health probe).

200 when every required check passes, else 503; the body is the same JSON either way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.utils import timezone

BROKER_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    required: bool = True
    detail: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "required": self.required, "seconds": round(self.seconds, 4), **self.detail}


@dataclass(frozen=True)
class HealthReport:
    checks: list[CheckResult]
    now: datetime

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks if check.required)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "fail",
            "time": self.now.isoformat(),
            "checks": {check.name: check.as_dict() for check in self.checks},
        }


def _timed(name: str, fn, *, required: bool = True) -> CheckResult:
    start = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception as exc:  # a health check reports failures, it never raises them
        ok, detail = False, {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return CheckResult(name=name, ok=ok, required=required, detail=detail, seconds=time.perf_counter() - start)


def health_check_database() -> CheckResult:
    def check():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return True, {"vendor": connection.vendor}

    return _timed("database", check)


def _redis_url() -> str:
    return settings.Q_CLUSTER.get("redis") or settings.REDIS_URL


def _redacted(url: str) -> str:
    """The URL without credentials: a health page must never echo a password."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def health_check_broker() -> CheckResult:
    """The broker named by the settings answers. Read from settings at call time, not from
    django-q2's import-time Conf, so the check follows the configuration it reports on."""
    kind = getattr(settings, "PIPELINE_OPS_BROKER", "orm")

    def check():
        queue = settings.Q_CLUSTER.get("name", "")
        if kind == "redis":
            import redis

            url = _redis_url()
            client = redis.Redis.from_url(
                url, socket_connect_timeout=BROKER_TIMEOUT_SECONDS, socket_timeout=BROKER_TIMEOUT_SECONDS,
            )
            try:
                client.ping()
                ready = client.llen(f"django_q:{queue}:q")
            finally:
                client.close()
            return True, {"broker": "redis", "url": _redacted(url), "queue": queue, "ready": ready}
        from django.db.models.functions import Now
        from django_q.models import OrmQ

        # The table brokers ("postgres", "orm"): django-q2's queue table in our own database.
        alias = settings.Q_CLUSTER.get("orm", "default")
        now = Now() if kind == "postgres" else timezone.now()  # the PostgreSQL broker's locks are on the database's clock
        ready = OrmQ.objects.using(alias).filter(key=queue, lock__lte=now).count()
        return True, {"broker": kind, "database": alias, "queue": queue, "ready": ready}

    result = _timed("broker", check)
    if not result.ok:
        result.detail.setdefault("broker", kind)
    return result


def health_check_cluster(*, now: datetime | None = None) -> CheckResult:
    now = now or timezone.now()
    max_age = float(getattr(settings, "HEALTHZ_CLUSTER_MAX_AGE_SECONDS", 30))
    required = bool(getattr(settings, "HEALTHZ_REQUIRE_CLUSTER", True))

    def check():
        from ..selectors.dashboard import cluster_heartbeats

        beats = [beat for beat in cluster_heartbeats(now=now) if beat.age_seconds is not None]
        if not beats:
            return False, {"clusters": 0, "error": "no cluster heartbeat seen: is a qcluster running?"}
        freshest = min(beat.age_seconds for beat in beats)
        detail = {
            "clusters": len(beats),
            "workers": sum(beat.workers for beat in beats),
            "last_heartbeat_age_seconds": round(max(freshest, 0.0), 3),
            "max_age_seconds": max_age,
        }
        if freshest > max_age:
            detail["error"] = f"last cluster heartbeat {freshest:.0f} s ago (more than {max_age:.0f} s)"
            return False, detail
        return True, detail

    return _timed("cluster", check, required=required)


def health_report(*, now: datetime | None = None) -> HealthReport:
    now = now or timezone.now()
    return HealthReport(
        checks=[health_check_database(), health_check_broker(), health_check_cluster(now=now)], now=now,
    )


def healthz_view(request: HttpRequest) -> JsonResponse:
    """GET /healthz: 200 or 503, JSON detail per check. Unauthenticated (load balancers call it);
    it reveals reachability and counts, never data or credentials."""
    report = health_report()
    response = JsonResponse(report.as_dict(), status=200 if report.ok else 503)
    response["Cache-Control"] = "no-store"
    return response
