"""Health, metrics and structured logs: what operators page on and search through.

* ``health``: ``/healthz`` (database, broker, cluster heartbeat; 200 or 503 with JSON detail);
* ``metrics``: ``/metrics`` in the Prometheus format, multiprocess-safe under gunicorn;
* ``logging``: a JSON formatter and a log context carrying input id, step, attempt and key.
"""
