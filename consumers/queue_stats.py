"""How full each hookgate queue is: ready messages and consumers over AMQP, unacked from the management API."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote, unquote

import httpx
from amqp.exceptions import NotFound
from kombu import Connection
from kombu.exceptions import OperationalError
from prometheus_client.core import GaugeMetricFamily, Metric

from consumers.channels import task_queues
from schemas import topology
from schemas.jobs import QueueOut
from schemas.settings import Settings

__all__ = ["BrokerStatsUnavailable", "QueueDepthCollector", "hookgate_queues", "queue_stats"]

_TIMEOUT_S = 3.0


class BrokerStatsUnavailable(Exception):
    """The broker (or its management API) did not answer."""


def hookgate_queues() -> tuple[str, ...]:
    """Every queue hookgate declares or its channels send to, each once."""
    return tuple(dict.fromkeys((topology.INGEST_QUEUE, topology.DEAD_QUEUE, *topology.BUILTIN_TASK_QUEUES,
                                *task_queues())))


def _amqp_counts(settings: Settings, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    try:
        with Connection(settings.broker_url, connect_timeout=_TIMEOUT_S) as conn:
            conn.ensure_connection(max_retries=1)
            for name in names:
                channel = conn.channel()
                try:
                    # A passive declare answers the counts without creating or changing anything.
                    _, ready, consumers = channel.queue_declare(name, passive=True)
                    counts[name] = (ready, consumers)
                except NotFound:
                    counts[name] = (0, 0)  # not declared yet: nothing waits in it, nobody consumes it
                finally:
                    channel.close()
    except (OSError, OperationalError) as exc:
        raise BrokerStatsUnavailable(f"the broker did not answer: {type(exc).__name__}") from exc
    return counts


def _unacked(settings: Settings, names: tuple[str, ...]) -> dict[str, int]:
    url = httpx.URL(settings.broker_url)
    vhost = unquote(url.path.lstrip("/")) or "/"
    auth = (unquote(url.username) or "guest", unquote(url.password) or "guest")
    unacked: dict[str, int] = {}
    try:
        with httpx.Client(base_url=settings.broker_management_url, auth=auth, timeout=_TIMEOUT_S) as client:
            for name in names:
                response = client.get(f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")
                if response.status_code == 404:
                    unacked[name] = 0
                    continue
                response.raise_for_status()
                unacked[name] = int(response.json().get("messages_unacknowledged", 0))
    except httpx.HTTPError as exc:
        raise BrokerStatsUnavailable(f"the broker's management API did not answer: {type(exc).__name__}") from exc
    return unacked


def queue_stats(settings: Settings) -> list[QueueOut]:
    """The figures of every hookgate queue, read from the broker now."""
    names = hookgate_queues()
    counts = _amqp_counts(settings, names)
    unacked = _unacked(settings, names) if settings.broker_management_url else {}
    return [QueueOut(name=name, messages_ready=counts[name][0], messages_unacknowledged=unacked.get(name),
                     consumers=counts[name][1]) for name in names]


class QueueDepthCollector:
    """Prometheus collector: every hookgate queue's ready and unacknowledged messages and its consumers,
    read from the broker at scrape time (the gateway's ``/metrics``).

    ``hookgate_queue_stats_up`` is 0 when the broker did not answer; the figures are then left out
    rather than reported as zeros.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("hookgate_queue_stats_up", "1 when the broker answered this scrape's queue figures.")
        try:
            stats = queue_stats(self._settings)
        except BrokerStatsUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        ready = GaugeMetricFamily("hookgate_queue_messages_ready", "Messages waiting in a hookgate queue.",
                                  labels=["queue"])
        unacked = GaugeMetricFamily("hookgate_queue_messages_unacknowledged",
                                    "Messages delivered to consumers and not yet acked (needs "
                                    "HOOKGATE_BROKER_MANAGEMENT_URL).", labels=["queue"])
        consumers = GaugeMetricFamily("hookgate_queue_consumers", "Consumers of a hookgate queue.", labels=["queue"])
        for queue in stats:
            ready.add_metric([queue.name], queue.messages_ready)
            consumers.add_metric([queue.name], queue.consumers)
            if queue.messages_unacknowledged is not None:
                unacked.add_metric([queue.name], queue.messages_unacknowledged)
        yield from (up, ready, unacked, consumers)
