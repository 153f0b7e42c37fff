"""The batched-confirm publisher: 'confirmed' only when the broker said so, errors in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from kombu import Connection

from consumers.publisher import BrokerUnavailable, ConfirmingPublisher, OutgoingMessage, PublishError
from consumers.topology import declare_topology
from schemas import topology
from tests.tcpproxy import TcpProxy


def _event(n: int, routing_key: str = "test.event") -> OutgoingMessage:
    return OutgoingMessage(topology.EVENTS_EXCHANGE, routing_key, b'{"n": %d}' % n, f"m-{n}-{uuid.uuid4()}")


def _ingest_depth(broker_url: str) -> int:
    with Connection(broker_url) as conn:
        return conn.default_channel.queue_declare(topology.INGEST_QUEUE, passive=True).message_count


def _purge(broker_url: str) -> None:
    with Connection(broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge(topology.INGEST_QUEUE)


@pytest.fixture
async def publisher(broker_url: str) -> AsyncIterator[ConfirmingPublisher]:
    _purge(broker_url)
    pub = ConfirmingPublisher(broker_url, confirm_timeout_s=2, max_batch=64, declare=declare_topology)
    await pub.start()
    assert await pub.wait_connected(10)
    yield pub
    await pub.close()


@pytest.fixture
def proxy(broker_url: str) -> Iterator[tuple[TcpProxy, str]]:
    parts = urlsplit(broker_url)
    tcp = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    yield tcp, urlunsplit(parts._replace(netloc=f"guest:guest@127.0.0.1:{tcp.port}"))
    tcp.close()


async def test_concurrent_publishes_are_all_confirmed_and_queued(publisher: ConfirmingPublisher,
                                                                 broker_url: str) -> None:
    """500 concurrent publishes, batched together, all return and all 500 messages are in the queue."""
    await asyncio.gather(*(publisher.publish([_event(i)]) for i in range(500)))
    assert _ingest_depth(broker_url) == 500


async def test_unroutable_message_fails_and_its_batchmates_do_not(publisher: ConfirmingPublisher) -> None:
    """A message no queue is bound for raises, while a message confirmed beside it succeeds."""
    bad = OutgoingMessage(topology.TASKS_EXCHANGE, "no-such-queue", b"{}", "unroutable-1")
    results = await asyncio.gather(publisher.publish([bad]), publisher.publish([_event(1)]), return_exceptions=True)
    assert isinstance(results[0], PublishError) and "unroutable" in str(results[0])
    assert results[1] is None


async def test_unreachable_broker_fails_fast() -> None:
    """With nothing listening, publish raises BrokerUnavailable at once instead of hanging."""
    pub = ConfirmingPublisher("amqp://guest:guest@127.0.0.1:1//", confirm_timeout_s=2, max_batch=8)
    await pub.start()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await pub.publish([_event(1)])
    assert time.monotonic() - started < 0.5
    await pub.close()


async def test_silent_broker_times_out_then_recovers(proxy: tuple[TcpProxy, str], broker_url: str) -> None:
    """A broker that goes silent with TCP open fails the publish within the confirm timeout; then it reconnects."""
    _purge(broker_url)
    tcp, url = proxy
    pub = ConfirmingPublisher(url, confirm_timeout_s=1, max_batch=8, connect_timeout_s=1)
    await pub.start()
    assert await pub.wait_connected(10)
    await pub.publish([_event(1)])
    tcp.pause()
    started = time.monotonic()
    with pytest.raises(PublishError):
        await pub.publish([_event(2)])
    assert time.monotonic() - started < 3
    tcp.cut()
    tcp.resume()
    deadline = time.monotonic() + 15
    while True:
        try:
            await pub.publish([_event(3)])
            break
        except PublishError:
            assert time.monotonic() < deadline, "the publisher did not recover"
            await asyncio.sleep(0.2)
    await pub.close()


async def test_idle_connection_survives_heartbeats(broker_url: str) -> None:
    """An idle publisher keeps its connection through many heartbeat intervals and publishes on it after."""
    _purge(broker_url)
    pub = ConfirmingPublisher(broker_url, confirm_timeout_s=2, max_batch=8, heartbeat_s=2)
    await pub.start()
    assert await pub.wait_connected(10)
    await asyncio.sleep(7)
    await pub.publish([_event(1)])
    assert pub.connections_made == 1
    await pub.close()


async def test_cut_connection_answers_every_waiting_publish(proxy: tuple[TcpProxy, str], broker_url: str) -> None:
    """When the connection drops under load, every publish in flight returns or raises promptly; none hangs."""
    _purge(broker_url)
    tcp, url = proxy
    pub = ConfirmingPublisher(url, confirm_timeout_s=5, max_batch=64, connect_timeout_s=1)
    await pub.start()
    assert await pub.wait_connected(10)

    async def timed(n: int) -> float:
        started = time.monotonic()
        with contextlib.suppress(PublishError):
            await pub.publish([_event(n)])
        return time.monotonic() - started

    pending = [asyncio.create_task(timed(n)) for n in range(300)]
    await asyncio.sleep(0.005)
    tcp.cut()
    durations = await asyncio.gather(*pending)
    assert max(durations) < 2.0
    await pub.close()
