"""Prometheus metrics of every hookgate process, defined once, and how each process exposes them.

Labels are bounded on purpose (outcome, channel): event types, ids and URLs are unbounded and
would grow a series per value. With ``PROMETHEUS_MULTIPROC_DIR`` set (before the process starts),
prometheus-client keeps values in files there and `render` and the metrics servers aggregate every
process that wrote to it: several uvicorn workers, or a Celery worker's prefork children.
"""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery.signals import worker_init
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = [
    "ATTEMPT_SECONDS",
    "CONTENT_TYPE",
    "DELIVERIES",
    "DELIVERIES_DEFERRED",
    "DELIVERIES_HELD",
    "DELIVERY_LATENCY_SECONDS",
    "ENDPOINT_PAUSED",
    "ENDPOINT_TRANSITIONS",
    "EVENTS_ACCEPTED",
    "EVENTS_DEAD_LETTERED",
    "EVENTS_DUPLICATE",
    "EVENTS_ROUTED",
    "PUBLISH_CONFIRM_SECONDS",
    "RETRIES_SCHEDULED",
    "render",
    "serve_metrics",
]

log = structlog.get_logger(__name__)

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

EVENTS_ACCEPTED = Counter(
    "hookgate_events_accepted_total",
    "Events posted to the gateway by outcome: accepted (confirmed, per event), rejected (invalid request, per "
    "request) or unavailable (503, per event).",
    ["outcome"],
)
PUBLISH_CONFIRM_SECONDS = Histogram(
    "hookgate_publish_confirm_seconds",
    "Time from handing an ingest request's events to the publisher to RabbitMQ's confirm.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
EVENTS_ROUTED = Counter("hookgate_events_routed_total", "New events the router stored and fanned out.")
EVENTS_DUPLICATE = Counter(
    "hookgate_events_duplicate_total", "Events the router found already stored (same source and id) and dropped."
)
EVENTS_DEAD_LETTERED = Counter(
    "hookgate_events_dead_lettered_total", "Ingest messages the router dead-lettered to hookgate.dead."
)
DELIVERIES = Counter(
    "hookgate_deliveries_total",
    "Delivery attempts recorded, by channel and where they left the delivery: succeeded, retrying or dead.",
    ["channel", "outcome"],
)
ATTEMPT_SECONDS = Histogram(
    "hookgate_attempt_seconds",
    "Duration of one delivery attempt (the HTTP request of a webhook).",
    ["channel"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RETRIES_SCHEDULED = Counter(
    "hookgate_retries_scheduled_total", "Delivery retries scheduled through the broker.", ["channel"]
)
DELIVERY_LATENCY_SECONDS = Histogram(
    "hookgate_delivery_latency_seconds",
    "From the gateway's accept of the event (its received_at) to its delivery's success, retries included.",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0, 36000.0, 86400.0),
)
# One series per subscription that ever paused: subscriptions are an operator's list, not traffic.
ENDPOINT_PAUSED = Gauge(
    "hookgate_endpoint_paused",
    "1 while a subscription's circuit breaker holds its deliveries, 0 once it resumed.",
    ["subscription_id"],
    multiprocess_mode="mostrecent",
)
ENDPOINT_TRANSITIONS = Counter(
    "hookgate_endpoint_transitions_total", "Endpoint state changes: paused, resumed, disabled.", ["transition"]
)
DELIVERIES_HELD = Counter(
    "hookgate_deliveries_held_total",
    "Deliveries held back by an endpoint's breaker, concurrency limit or disabled subscription.",
    ["channel"],
)
DELIVERIES_DEFERRED = Counter(
    "hookgate_deliveries_deferred_total", "Deliveries deferred to a later send slot by a rate limit or probe.",
    ["channel"],
)


def _registry() -> CollectorRegistry:
    if not os.environ.get(_MULTIPROC_ENV):
        return REGISTRY
    # The collector reads every process's files at each scrape, so processes that start later are included.
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def render(*collectors: Collector) -> bytes:
    """This process's metrics, or every process's under ``PROMETHEUS_MULTIPROC_DIR``, in the text format;
    then ``collectors``' figures, gathered now (not counted by any process)."""
    text = generate_latest(_registry())
    if collectors:
        extra = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            extra.register(collector)
        text += generate_latest(extra)
    return text


def serve_metrics(port: int, host: str, process: str) -> None:
    """Serve `render`'s metrics on ``host:port`` from a daemon thread; for processes without an HTTP API."""
    start_http_server(port, addr=host, registry=_registry())
    log.info("metrics_serving", process=process, host=host, port=port,
             multiprocess=bool(os.environ.get(_MULTIPROC_ENV)))


@worker_init.connect
def _serve_worker_metrics(sender: Any, **_: Any) -> None:
    # The worker's main process serves; prefork children only count, so without the multiprocess
    # directory their counts never reach this server.
    settings = sender.app.conf.get("hookgate_settings")
    if settings is None or not settings.worker_metrics_port:
        return
    pool = sender.pool_cls  # a name or a class, depending on how the worker was started
    if not os.environ.get(_MULTIPROC_ENV) and "prefork" in (pool if isinstance(pool, str) else pool.__module__):
        log.warning("worker_metrics_need_multiproc_dir", variable=_MULTIPROC_ENV,
                    detail="prefork children's metrics are invisible to the main process without it")
    serve_metrics(settings.worker_metrics_port, settings.host, "worker")
