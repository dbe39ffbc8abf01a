"""Settings for pipeline-ops, read from the environment.

Every knob an operator may turn is an environment variable with a safe default, so the embedded
default (SQLite + django-q2's ORM broker) runs with no configuration at all and production only
sets ``DATABASE_URL``, ``SECRET_KEY`` and friends.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("PIPELINE_OPS_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


DEBUG = env_bool("DEBUG", False)
# Dates in the console with seconds and the time zone (pipeline_ops/formats/en/formats.py).
FORMAT_MODULE_PATH = "pipeline_ops.formats"
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG and not env_bool("PIPELINE_OPS_INSECURE_DEV_KEY", False):
        raise ImproperlyConfigured(
            "SECRET_KEY is required when DEBUG is off (set DEBUG=1 for local development)."
        )
    # Development only: DEBUG or an explicit opt-in. Never used when DEBUG is off without opt-in.
    SECRET_KEY = "insecure-development-key-do-not-use-in-production"

ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "idempotency",
    "pipeline_ops",
]

MIDDLEWARE = [
    # First, so responses made by any later middleware (throttles, body limits) are counted too.
    "pipeline_ops.observability.metrics.ResponseMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "pipeline_ops.urls"
WSGI_APPLICATION = "pipeline_ops.wsgi.application"
ASGI_APPLICATION = "pipeline_ops.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# TEST_DB_TAG keeps concurrent test runs (several developers, or SQLite and PostgreSQL passes)
# on separate test databases.
TEST_DB_TAG = os.environ.get("TEST_DB_TAG", "main")
# This process is a django-q2 cluster (`manage.py qcluster`): see CONN_HEALTH_CHECKS below.
_RUNS_QCLUSTER = len(sys.argv) > 1 and sys.argv[1] == "qcluster"
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'pipeline_ops.sqlite3'}"
_db = dj_database_url.parse(DATABASE_URL)
if _db["ENGINE"] == "django.db.backends.sqlite3":
    _db["OPTIONS"] = {
        # WAL lets readers run beside the single writer; IMMEDIATE takes the write lock at BEGIN
        # so concurrent writers queue on the busy timeout instead of failing with "database is
        # locked" when a read transaction tries to upgrade.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    # A file, not :memory:, so a real qcluster subprocess sees the test database.
    _db["TEST"] = {"NAME": str(VAR_DIR / f"test-{TEST_DB_TAG}.sqlite3")}
else:
    # Persistent connections: CONN_MAX_AGE=0 reconnects per django-q2 enqueue (~36 tasks/s here).
    _db["CONN_MAX_AGE"] = env_int("CONN_MAX_AGE", 600)
    # Health checks cost a `SELECT 1` before each task in the workers (django-q2 closes old
    # connections around every task). The workers do without: each of their database moves is
    # retried through an infrastructure error on a fresh connection (idempotency.faults), so a
    # stale connection costs one retry, not a lost step. The web keeps them (a request has no retry).
    _db["CONN_HEALTH_CHECKS"] = env_bool("CONN_HEALTH_CHECKS", not _RUNS_QCLUSTER)
    _db["TEST"] = {"NAME": f"test_pipeline_ops_{TEST_DB_TAG}"}
    # `chaos --db-faults` only (pipeline_ops/chaos/dbfaults.py): the worker clusters' connections
    # carry a name the driver finds in pg_stat_activity to pg_terminate_backend them, and a short
    # lock_timeout for this process's sessions alone. Unset (production): nothing changes.
    if os.environ.get("PIPELINE_OPS_DB_APPLICATION_NAME"):
        _db.setdefault("OPTIONS", {})["application_name"] = os.environ["PIPELINE_OPS_DB_APPLICATION_NAME"]
    if os.environ.get("PIPELINE_OPS_DB_LOCK_TIMEOUT_MS"):
        _db.setdefault("OPTIONS", {})["options"] = f"-c lock_timeout={int(os.environ['PIPELINE_OPS_DB_LOCK_TIMEOUT_MS'])}"
DATABASES = {"default": _db}
DATABASE_IS_SQLITE = _db["ENGINE"] == "django.db.backends.sqlite3"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# --- The idempotency app (one namespaced dict, read lazily by idempotency.conf) ---------------
IDEMPOTENCY = {
    "LEASE_SECONDS": env_int("IDEMPOTENCY_LEASE_SECONDS", 30),
    # Key retention (replays) and the longer history retention (attempts, step runs, audit).
    "RETENTION_HOURS": env_int("IDEMPOTENCY_RETENTION_HOURS", 24),
    "HISTORY_RETENTION_HOURS": env_int("IDEMPOTENCY_HISTORY_RETENTION_HOURS", 720),
    # A step's record (its attempts: the console's timeline) stays while its step run does.
    "HISTORY_KEEP": "pipeline_ops.services.retention.records_in_use",
    "PURGE_BATCH_SIZE": env_int("IDEMPOTENCY_PURGE_BATCH_SIZE", 1000),
    "MAX_WAIT_SECONDS": env_int("IDEMPOTENCY_MAX_WAIT_SECONDS", 10),
    # Off behind a transaction pooler (PgBouncer transaction mode): see docs/guard.md, liveness.
    "LIVENESS_LOCKS": env_bool("IDEMPOTENCY_LIVENESS_LOCKS", True),
}

# --- django-q2 --------------------------------------------------------------------------------
# django-q2 is only the delivery: our Attempt table counts starts, schedules retries and
# dead-letters. See ../shared/reference/django-q2.md for the measurements behind each number.
STEP_TIMEOUT_SECONDS = env_int("STEP_TIMEOUT_SECONDS", 300)
# How long a step keeps retrying its database moves through infrastructure errors (a restart, a
# failover, a dropped connection, a deadlock, a lock timeout) before it gives up on that move.
# The completion gets longer: it carries a (paid) model answer, and it keeps its lease alive
# meanwhile. Both stay well inside STEP_TIMEOUT_SECONDS, after which django-q2 kills the worker.
PIPELINE_OPS_DB_RETRY_SECONDS = env_int("PIPELINE_OPS_DB_RETRY_SECONDS", 30)
PIPELINE_OPS_COMPLETION_RETRY_SECONDS = env_int("PIPELINE_OPS_COMPLETION_RETRY_SECONDS", 90)
# Operator actions on more targets than this run in the background, this many targets a task
# (services.bulk): a request never works through thousands, a task stays far inside its timeout.
PIPELINE_OPS_BULK_THRESHOLD = env_int("PIPELINE_OPS_BULK_THRESHOLD", 200)
PIPELINE_OPS_BULK_SLICE = env_int("PIPELINE_OPS_BULK_SLICE", 500)
# A background action whose row did not move for this long (its task was lost) is re-sent.
PIPELINE_OPS_BULK_STALL_SECONDS = env_int("PIPELINE_OPS_BULK_STALL_SECONDS", 600)
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
_q_workers = env_int("Q_WORKERS", 2)
# Up to one task per worker in each dequeue: fewer queue round trips per task, never more than
# workers (django-q2.md rule 10).
_q_bulk = max(1, min(_q_workers, env_int("Q_BULK", 4)))
Q_CLUSTER = {
    "name": os.environ.get("PIPELINE_OPS_QUEUE", "pipeline_ops"),
    "workers": _q_workers,
    # The retry clock starts at dequeue, prefetch included: keep the prefetch at one task per
    # worker so retry >= (queue_limit / workers + 1) * timeout + margin holds.
    "queue_limit": _q_workers,
    "bulk": _q_bulk,
    # django-q2's ORM broker answers a step's enqueue on an idle queue within this: one SELECT
    # of the small queue table per 50 ms per cluster. The PostgreSQL broker wakes on NOTIFY and
    # polls only as its fallback (set below).
    "poll": float(os.environ.get("Q_POLL", "0.05")),
    "timeout": STEP_TIMEOUT_SECONDS,
    # A dequeued task waits behind at most queue_limit + bulk - 1 others (the pusher blocks on a
    # full queue holding the rest of its batch), so it starts and ends within
    # (ceil((queue_limit + bulk) / workers) + 1) * timeout: only then may its row be handed out
    # again. Q_RETRY_SECONDS: only for chaos runs and cluster tests, which SIGKILL clusters and
    # want a dead cluster's prefetched tasks back in seconds.
    "retry": env_int("Q_RETRY_SECONDS", (-(-(_q_workers + _q_bulk) // _q_workers) + 1) * STEP_TIMEOUT_SECONDS + 120),
    # A task whose function raised (a bug, a hard timeout) is acknowledged too: our Attempt table
    # decides retries (the reconciler re-sends a step whose message is gone), not a redelivery loop.
    "ack_failures": True,
    # django-q2's own re-delivery count is not ours: one delivery per message, the guard does the rest.
    "max_attempts": 1,
    # Our tables hold results and attempts. -1 saves no Task row for a success: save_limit=250
    # locks every Success row per task (~100/s cap) and 0 keeps every success forever. Failures
    # (a crashed task function, a hard timeout) are still saved for the admin.
    "save_limit": env_int("Q_SAVE_LIMIT", -1),
    "catch_up": False,
    "recycle": 500,
    "log_level": os.environ.get("Q_LOG_LEVEL", "WARNING"),
    "label": "Task queue (delivery only)",
}
# The broker (docs/queue.md): "postgres" (the default on PostgreSQL) is pipeline-ops' own broker
# over django-q2's ORM table, dequeuing with FOR UPDATE SKIP LOCKED and waking on LISTEN/NOTIFY;
# "orm" is django-q2's ORM broker (the default on SQLite); "redis" is django-q2's Redis broker.
# Both table brokers use the models' alias, so an enqueue joins the caller's transaction (an outbox).
PIPELINE_OPS_BROKER = os.environ.get("PIPELINE_OPS_BROKER", "orm" if DATABASE_IS_SQLITE else "postgres").strip().lower()
if PIPELINE_OPS_BROKER == "redis":
    Q_CLUSTER["redis"] = REDIS_URL
elif PIPELINE_OPS_BROKER == "orm":
    Q_CLUSTER["orm"] = "default"
elif PIPELINE_OPS_BROKER == "postgres":
    if DATABASE_IS_SQLITE:
        raise ImproperlyConfigured(
            "PIPELINE_OPS_BROKER=postgres needs a PostgreSQL DATABASE_URL (it dequeues with FOR UPDATE SKIP LOCKED "
            "and wakes on LISTEN/NOTIFY); on SQLite use PIPELINE_OPS_BROKER=orm."
        )
    # "orm" too: django-q2's admin shows the queued rows, and the broker writes through this alias.
    Q_CLUSTER["orm"] = "default"
    Q_CLUSTER["broker_class"] = "pipeline_ops.pg_broker.PostgresBroker"
    # NOTIFY wakes an idle cluster at once; the poll only finds rows whose lock expired (a crashed
    # worker's) and covers a dropped listening connection, and a graceful stop waits up to it.
    Q_CLUSTER["poll"] = float(os.environ.get("Q_POLL", "1.0"))
else:
    raise ImproperlyConfigured(
        f"PIPELINE_OPS_BROKER must be 'postgres', 'orm' or 'redis', not {PIPELINE_OPS_BROKER!r}."
    )

# Cluster heartbeats (django-q2 Stat, one write per cluster every 0.5 s, 3 s expiry). With Redis
# they live in Redis; with the ORM broker they go to this cache, which must be shared by the
# clusters and the web (/healthz, dashboard): a per-process LocMemCache would never show one.
# "file" (default) shares them between the processes of one host; several hosts on the ORM broker
# use "database" (run `manage.py createcachetable` once).
Q_STATS_CACHE = os.environ.get("Q_STATS_CACHE", "file").lower()
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
if Q_STATS_CACHE == "file":
    CACHES["django_q_stats"] = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(VAR_DIR / "q-stats")}
elif Q_STATS_CACHE == "database":
    CACHES["django_q_stats"] = {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "pipeline_ops_q_stats"}
else:
    raise ImproperlyConfigured(f"Q_STATS_CACHE must be 'file' or 'database', not {Q_STATS_CACHE!r}.")
Q_CLUSTER["cache"] = "django_q_stats"

# /healthz (pipeline_ops.observability.health): the cluster check fails when the freshest
# heartbeat is older than this, or none is seen; HEALTHZ_REQUIRE_CLUSTER=0 reports without failing.
HEALTHZ_CLUSTER_MAX_AGE_SECONDS = env_int("HEALTHZ_CLUSTER_MAX_AGE_SECONDS", 30)
HEALTHZ_REQUIRE_CLUSTER = env_bool("HEALTHZ_REQUIRE_CLUSTER", True)

# --- Operators' console -------------------------------------------------------------------------
# Bulk retries release at most this many steps per second (the rest wait as RETRY_WAIT and the
# reconciler sends them when due), so a recovering model provider is not flooded. 0 = no spreading.
PIPELINE_OPS_RETRY_RATE = float(os.environ.get("PIPELINE_OPS_RETRY_RATE", "5"))

# --- Django REST framework ----------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # DRF's "Authorization: Token <token>", looked up by its SHA-256 (tokens are stored hashed).
        "pipeline_ops.api.authentication.HashedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # One handler renders every API error as application/problem+json with a stable `code`.
    "EXCEPTION_HANDLER": "idempotency.drf.problem_exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["pipeline_ops.api.throttles.ApiClientRateThrottle"],
    "DEFAULT_PAGINATION_CLASS": "pipeline_ops.api.pagination.InputCursorPagination",
}

# --- The REST API (pipeline_ops.api; read lazily by pipeline_ops.api.conf) -----------------------
PIPELINE_OPS_API = {
    "MAX_BODY_BYTES": env_int("API_MAX_BODY_BYTES", 256 * 1024),
    "MAX_TEXT_CHARS": env_int("API_MAX_TEXT_CHARS", 20_000),
    "MAX_JSON_DEPTH": env_int("API_MAX_JSON_DEPTH", 8),
    "THROTTLE_RATE": os.environ.get("API_THROTTLE_RATE", "600/minute"),
    "PAGE_SIZE": env_int("API_PAGE_SIZE", 50),
    "MAX_PAGE_SIZE": 200,
}
# bench/api.py only: mounts /api/v1/_bench/inputs/, the submission without the idempotency layer.
PIPELINE_OPS_API_BENCH = env_bool("PIPELINE_OPS_API_BENCH", False)

SPECTACULAR_SETTINGS = {
    "TITLE": "pipeline-ops API",
    "VERSION": "1.0.0",
    "DESCRIPTION": (BASE_DIR / "pipeline_ops" / "api" / "description.md").read_text(encoding="utf-8"),
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Offline: the Swagger UI and Redoc assets come from drf-spectacular-sidecar, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "InputStatusEnum": "pipeline_ops.states.InputStatus",
        "StepStatusEnum": "pipeline_ops.states.StepStatus",
    },
}

# LOG_FORMAT=json: one JSON object per line, carrying input id, step, attempt number and key
# (pipeline_ops.observability.logging); "text" (default) keeps plain messages.
LOG_FORMAT = os.environ.get("LOG_FORMAT", "text").lower()
if LOG_FORMAT not in {"text", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be 'text' or 'json', not {LOG_FORMAT!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"log_context": {"()": "pipeline_ops.observability.logging.LogContextFilter"}},
    "formatters": {"json": {"()": "pipeline_ops.observability.logging.JsonFormatter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["log_context"],
            **({"formatter": "json"} if LOG_FORMAT == "json" else {}),
        }
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}

# --- Pipelines ----------------------------------------------------------------------------------
# An ordered list of named steps per pipeline (steps are registered in pipeline_ops.steps).
PIPELINES = {
    "default": {
        "description": "Offline: clean the text, score its sentiment (VADER), summarise it extractively.",
        "steps": ["preprocess", "sentiment", "summarise"],
    },
    "llm": {
        "description": "Clean the text, score its sentiment, then ask an OpenAI-compatible chat endpoint.",
        "steps": ["preprocess", "sentiment", "llm"],
    },
}

# --- Steps, the LLM endpoint, the reconciler, integrity checks (docs/pipelines.md) ---------------
# The llm step's OpenAI-compatible endpoint; empty means the llm pipeline's last step fails
# permanently with a clear message (the default pipeline needs no endpoint).
LLM_BASE_URL = os.environ.get("LLM_BASE_URL", "")
LLM_MODEL = os.environ.get("LLM_MODEL", "pipeline-ops-local")
LLM_API_KEY = os.environ.get("LLM_API_KEY", "")
LLM_CONNECT_TIMEOUT_SECONDS = float(os.environ.get("LLM_CONNECT_TIMEOUT_SECONDS", "5"))
# The read timeout: a model slower than this ends its attempt as UNKNOWN and is retried with the
# same Idempotency-Key. Keep it well below STEP_TIMEOUT_SECONDS (django-q2's hard kill).
LLM_TIMEOUT_SECONDS = float(os.environ.get("LLM_TIMEOUT_SECONDS", "30"))
# Per-step policy overrides, e.g. '{"llm": {"max_attempts": 8, "lease_seconds": 90}}'.
PIPELINE_STEP_POLICIES = json.loads(os.environ.get("PIPELINE_STEP_POLICIES", "{}"))
PREPROCESS_MAX_CHARS = env_int("PREPROCESS_MAX_CHARS", 20000)
SUMMARY_SENTENCES = env_int("SUMMARY_SENTENCES", 2)
# The reconciler's loop period (the django-q2 schedule runs it every minute), and how long a
# QUEUED step may sit with no broker row (ORM) or at all (Redis) before it counts as lost.
RECONCILER_INTERVAL_SECONDS = env_int("RECONCILER_INTERVAL_SECONDS", 60)
RECONCILER_LOST_GRACE_SECONDS = env_int("RECONCILER_LOST_GRACE_SECONDS", 60)
RECONCILER_BATCH_SIZE = env_int("RECONCILER_BATCH_SIZE", 500)
# verify_integrity: how long an input may sit with no live work, or a record past its lease,
# before it is a violation (longer than the reconciler's period plus a retry's backoff).
INTEGRITY_GRACE_SECONDS = env_int("INTEGRITY_GRACE_SECONDS", 600)
