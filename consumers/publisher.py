"""Publishing with batched publisher confirms through kombu, awaitable from asyncio.

kombu's own ``confirm_publish`` waits for each confirm before the next publish (~1,700 msgs/s,
round-trip bound). Here one thread owns one connection: it takes every request waiting, publishes
them all on a channel in confirm mode, then drains the broker's acks and nacks by delivery tag and
settles each request once all of its messages are settled. Throughput is then a batch per round
trip, and the event loop never blocks on the broker.

Errors::

    PublishError            the messages may or may not have reached the broker: answer 503
     +-- BrokerUnavailable  no connection right now; nothing was sent
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import amqp
import structlog
from amqp.method_framing import frame_writer
from kombu import Connection

from schemas.events import CloudEvent
from schemas.topology import EVENTS_EXCHANGE

__all__ = ["STRUCTURED_MEDIA_TYPE", "BrokerUnavailable", "ConfirmingPublisher", "OutgoingMessage", "PublishError",
           "event_message"]

log = structlog.get_logger(__name__)

_PERSISTENT = 2
# How often an idle publisher reads and sends heartbeats; well under any heartbeat interval used.
_IDLE_POLL_S = 0.5
_RECONNECT_MAX_S = 5.0


class PublishError(Exception):
    """Publishing failed or was not confirmed in time."""


class BrokerUnavailable(PublishError):
    """The publisher has no connection to the broker."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One persistent message; ``message_id`` also matches a returned (unroutable) message to it."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    content_type: str = "application/json"
    headers: dict[str, Any] | None = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Request:
    messages: Sequence[OutgoingMessage]
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop
    unsettled: int = 0
    error: str | None = None


STRUCTURED_MEDIA_TYPE = "application/cloudevents+json"


def event_message(event: CloudEvent, headers: dict[str, Any] | None = None) -> OutgoingMessage:
    """An event as the AMQP contract has it: on hookgate.events, routed by its type, ``message_id`` its id."""
    return OutgoingMessage(exchange=EVENTS_EXCHANGE, routing_key=event.type, body=event.to_json(),
                           message_id=event.id, content_type=STRUCTURED_MEDIA_TYPE, headers=headers)


class ConfirmingPublisher:
    """A publishing thread with one confirm-mode channel; ``publish`` awaits the confirms."""

    def __init__(
        self,
        broker_url: str,
        *,
        confirm_timeout_s: float,
        max_batch: int,
        connect_timeout_s: float = 3.0,
        declare: Callable[[Connection], None] | None = None,
        name: str = "publisher",
        heartbeat_s: float = 30.0,
    ) -> None:
        self._url = broker_url
        self._confirm_timeout_s = confirm_timeout_s
        self._max_batch = max_batch
        self._connect_timeout_s = connect_timeout_s
        self._declare = declare
        self._name = name
        self._heartbeat_s = heartbeat_s
        self.connections_made = 0
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connected = threading.Event()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        """Start the thread; it connects (and keeps reconnecting) on its own, so a broker down at start is fine."""
        self._thread = threading.Thread(target=self._run, name=f"hookgate-{self._name}", daemon=True)
        self._thread.start()

    async def wait_connected(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self._connected.wait, timeout_s)

    async def close(self) -> None:
        self._stopping.set()
        self._requests.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self._confirm_timeout_s + self._connect_timeout_s + 1)

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Return once the broker confirmed every message; raise ``PublishError`` otherwise."""
        if not messages:
            return
        if not self._connected.is_set():
            raise BrokerUnavailable("no connection to the broker")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._requests.put(_Request(messages, future, loop))
        try:
            # The thread settles every request within the confirm timeout; this only guards a stuck thread.
            async with asyncio.timeout(self._confirm_timeout_s + self._connect_timeout_s):
                await future
        except TimeoutError as exc:
            raise PublishError("the broker did not confirm in time") from exc

    # -- the publishing thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff_s = 0.2
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                log.warning("broker_connect_failed", publisher=self._name, error=str(exc), retry_in_s=backoff_s)
                self._fail_waiting("no connection to the broker")
                self._stopping.wait(backoff_s)
                backoff_s = min(backoff_s * 2, _RECONNECT_MAX_S)
                continue
            backoff_s = 0.2
            self.connections_made += 1
            self._connected.set()
            log.info("broker_connected", publisher=self._name)
            try:
                self._serve(conn)
            except Exception as exc:
                log.warning("broker_connection_lost", publisher=self._name, error=str(exc))
            finally:
                self._connected.clear()
                self._discard(conn, graceful=self._stopping.is_set())
        self._fail_waiting("the publisher is shutting down")

    def _connect(self) -> Connection:
        conn = Connection(self._url, connect_timeout=self._connect_timeout_s, heartbeat=self._heartbeat_s)
        try:
            conn.connect()
            if self._declare is not None:
                self._declare(conn)
        except BaseException:
            self._discard(conn)
            raise
        return conn

    @staticmethod
    def _discard(conn: Connection, *, graceful: bool = False) -> None:
        # After any publish error the channel's confirm count is unknown: never reuse it. Only a clean
        # stop says goodbye: the AMQP close handshake waits without a timeout on a silent broker.
        if graceful:
            with contextlib.suppress(Exception):
                conn.release()
                return
        conn.collect()

    def _serve(self, conn: Connection) -> None:
        channel: amqp.Channel = conn.channel()
        channel.confirm_select()
        tags: dict[int, _Request] = {}
        returned: set[tuple[str, str]] = set()
        channel.events["basic_ack"].add(lambda tag, multiple: self._settle(tags, tag, multiple, None))
        channel.events["basic_nack"].add(
            lambda tag, multiple: self._settle(tags, tag, multiple, "the broker refused the message")
        )
        channel.events["basic_return"].add(
            lambda exc, exchange, routing_key, message: returned.add(
                (routing_key, message.properties.get("message_id", ""))
            )
        )
        # py-amqp writes each publish with its own syscall; framing a batch into one buffer with
        # py-amqp's own frame writer and sending it at once halves the thread's CPU per message.
        frames = _FrameBuffer()
        direct_writer, buffered_writer = conn.connection.frame_writer, frame_writer(conn.connection, frames)
        next_tag = 0
        while not self._stopping.is_set():
            batch = self._take_batch(conn)
            if batch is None:
                continue
            by_key: dict[tuple[str, str], list[_Request]] = {}
            try:
                conn.connection.frame_writer = buffered_writer
                try:
                    for request in batch:
                        request.unsettled = len(request.messages)
                        for message in request.messages:
                            next_tag += 1
                            tags[next_tag] = request
                            by_key.setdefault((message.routing_key, message.message_id), []).append(request)
                            channel.basic_publish(_to_amqp(message), exchange=message.exchange,
                                                  routing_key=message.routing_key, mandatory=True)
                finally:
                    conn.connection.frame_writer = direct_writer
                conn.connection.transport.write(frames.take())
                deadline = time.monotonic() + self._confirm_timeout_s
                while tags:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    conn.drain_events(timeout=remaining)
            except TimeoutError:
                self._complete(batch, returned, by_key, "the broker did not confirm in time")
                raise PublishError("confirm timeout") from None
            except BaseException:
                # Every request of the batch is answered, whatever broke: nobody waits for a dead connection.
                self._complete(batch, returned, by_key, "the connection to the broker was lost")
                raise
            self._complete(batch, returned, by_key, None)
            returned.clear()

    def _take_batch(self, conn: Connection) -> list[_Request] | None:
        try:
            first = self._requests.get(timeout=_IDLE_POLL_S)
        except queue.Empty:
            # Idle: read what the broker sent (its heartbeats count only once read), then send ours.
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0)
            conn.heartbeat_check()
            return None
        if first is None:
            return None
        batch, count = [first], len(first.messages)
        while count < self._max_batch:
            try:
                more = self._requests.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._requests.put(None)
                break
            batch.append(more)
            count += len(more.messages)
        return batch

    @staticmethod
    def _settle(tags: dict[int, _Request], tag: int, multiple: bool, error: str | None) -> None:
        settled = [t for t in tags if t <= tag] if multiple else [tag]
        for t in settled:
            request = tags.pop(t, None)
            if request is not None:
                request.unsettled -= 1
                if error is not None:
                    request.error = error

    def _complete(self, batch: list[_Request], returned: set[tuple[str, str]],
                  by_key: dict[tuple[str, str], list[_Request]], error: str | None) -> None:
        for key in returned:
            for request in by_key.get(key, ()):
                request.error = f"unroutable: no queue is bound for routing key {key[0]!r}"
        for request in batch:
            if request.error is None and (error is not None or request.unsettled):
                request.error = error or "not confirmed"
        _hand_back(batch)

    def _fail_waiting(self, reason: str) -> None:
        waiting: list[_Request] = []
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.error = reason
                waiting.append(request)
        _hand_back(waiting)


class _FrameBuffer:
    """A transport stand-in for py-amqp's frame writer: keeps the frames for one write."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: memoryview | bytes) -> None:
        self._chunks.append(bytes(data))  # the writer reuses its buffer: copy now

    def take(self) -> bytes:
        data, self._chunks = b"".join(self._chunks), []
        return data


def _to_amqp(message: OutgoingMessage) -> amqp.Message:
    return amqp.Message(
        message.body,
        delivery_mode=_PERSISTENT,
        content_type=message.content_type,
        message_id=message.message_id,
        application_headers=message.headers,
        **message.properties,
    )


def _hand_back(requests: list[_Request]) -> None:
    """Wake each waiting event loop once for all of its settled requests, not once per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
    for request in requests:
        by_loop.setdefault(request.loop, []).append(request)
    for loop, settled in by_loop.items():
        # A closed loop raises RuntimeError: nobody is waiting there any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, settled)


def _resolve(requests: list[_Request]) -> None:
    for request in requests:
        if request.future.done():
            continue
        if request.error is None:
            request.future.set_result(None)
        else:
            request.future.set_exception(PublishError(request.error))
