"""Point *this* process's django-q2 client at the broker and queue the chaos clusters use.

django-q2 reads ``Q_CLUSTER`` once at import into the class ``Conf``; ``override_settings`` does
nothing to it (reference/django-q2.md, §8 gotcha 1). Child clusters get their broker through their
environment; the driver process (the chaos command, a test, the benchmark) enqueues through the
same code path as the product (``queueing.step_run_enqueue``), so for the length of a run we
swap the few ``Conf`` attributes that choose the broker and sign payloads, and restore them after.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from django.test.utils import override_settings
from django_q.brokers import Broker, get_broker
from django_q.conf import Conf

from .. import queueing

BROKERS = ("postgres", "orm", "redis")
# django-q2 picks a broker_class before anything else (django_q.brokers.get_broker).
POSTGRES_BROKER_CLASS = "pipeline_ops.pg_broker.PostgresBroker"


def queue_name_for(tag: str, purpose: str = "chaos") -> str:
    """A queue (cluster) name of its own, so chaos tasks never reach another cluster's workers."""
    return f"pipeline_ops_{purpose}_{tag}"


@contextmanager
def use_broker(*, kind: str, queue: str, redis_url: str | None = None) -> Iterator[Broker]:
    """Enqueue to ``kind`` ('postgres', 'orm' or 'redis') under queue name ``queue`` inside the block."""
    if kind not in BROKERS:
        raise ValueError(f"broker must be one of {', '.join(BROKERS)}, not {kind!r}")
    saved = {name: getattr(Conf, name) for name in ("ORM", "REDIS", "BROKER_CLASS", "PREFIX", "CLUSTER_NAME")}
    Conf.PREFIX = Conf.CLUSTER_NAME = queue  # the list key, and the salt payloads are signed with
    if kind == "postgres":
        Conf.ORM, Conf.REDIS, Conf.BROKER_CLASS = "default", saved["REDIS"], POSTGRES_BROKER_CLASS
    elif kind == "orm":
        Conf.ORM, Conf.REDIS, Conf.BROKER_CLASS = "default", saved["REDIS"], None
    else:
        Conf.ORM, Conf.REDIS, Conf.BROKER_CLASS = None, redis_url or settings.REDIS_URL, None
    queueing.process_broker.cache_clear()
    try:
        with override_settings(PIPELINE_OPS_BROKER=kind):
            yield get_broker(queue)
    finally:
        for name, value in saved.items():
            setattr(Conf, name, value)
        queueing.process_broker.cache_clear()
