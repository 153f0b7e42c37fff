"""The router: consumes ``hookgate.ingest`` and turns each event into deliveries and Celery tasks.

For a batch of messages: decode (dead-letter what cannot be decoded, with the reason in a
header; a batch message, ``consumers.batches``, gives each of its events or is dead-lettered
whole), persist new events and one delivery per matching subscription in one transaction
(duplicates of (source, id) are not stored twice), publish one Celery task per delivery with
publisher confirms, and only then ack. A crash anywhere before the ack redelivers the batch,
and the store's uniqueness makes the second pass harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aio_pika
import orjson
import structlog
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from celery import Celery
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from consumers.batches import BATCH_MEDIA_TYPE, decode_batch
from consumers.celery_app import make_celery
from consumers.channels import TaskQueues, delivery_task_messages, task_queues
from consumers.metrics import EVENTS_DEAD_LETTERED, EVENTS_DUPLICATE, EVENTS_ROUTED, serve_metrics
from consumers.publisher import ConfirmingPublisher, OutgoingMessage, PublishError
from consumers.runtime import tune_gc
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.ingest import ActiveSubscription, PendingDelivery, load_active_subscriptions, persist_events
from consumers.topology import declare_topology
from schemas import topology
from schemas.events import CloudEvent, EnvelopeError, event_from_binary, event_from_json
from schemas.ids import new_id
from schemas.settings import Settings

__all__ = ["Router", "decode_events", "decode_message", "run"]

log = structlog.get_logger(__name__)

# Failures of the store or the broker pause the router (the batch is held and retried) instead of
# requeueing: a requeue counts towards the queue's delivery limit and would dead-letter good events.
_TRANSIENT = (OperationalError, InterfaceError, PublishError)
_RETRY_MAX_S = 5.0
_CE_PREFIXES = ("cloudEvents:", "cloudEvents_")


def decode_message(body: bytes, headers: dict[str, Any], content_type: str | None, message_id: str | None,
                   app_id: str | None, max_bytes: int) -> CloudEvent:
    """Decode one AMQP message: our JSON (plain or structured), or the CloudEvents AMQP binary binding."""
    _check_size(body, max_bytes)
    try:
        attributes = {
            key[len(prefix):]: _text(value)
            for key, value in headers.items()
            for prefix in _CE_PREFIXES
            if key.startswith(prefix)
        }
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"a cloudEvents attribute is not UTF-8: {exc}") from exc
    if attributes:
        return event_from_binary(attributes, body, content_type)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"the message body is not JSON: {exc}") from exc
    return event_from_json(obj, default_id=message_id or None, default_source=_amqp_source(app_id))


def decode_events(body: bytes, headers: dict[str, Any], content_type: str | None, message_id: str | None,
                  app_id: str | None, max_bytes: int) -> list[CloudEvent]:
    """One AMQP message's events: each of a batch message (``consumers.batches``), or the one of any other."""
    if content_type != BATCH_MEDIA_TYPE:
        return [decode_message(body, headers, content_type, message_id, app_id, max_bytes)]
    _check_size(body, max_bytes)
    return decode_batch(body, message_id=message_id or None, default_source=_amqp_source(app_id))


def _check_size(body: bytes, max_bytes: int) -> None:
    if len(body) > max_bytes:
        raise EnvelopeError(f"the message body is {len(body)} bytes, over the limit of {max_bytes}")


def _amqp_source(app_id: str | None) -> str:
    return f"urn:hookgate:amqp:{app_id}" if app_id else "urn:hookgate:amqp"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Router:
    """Turns ingest messages into deliveries; one instance per process."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], publisher: ConfirmingPublisher,
                 celery: Celery) -> None:
        self._settings = settings
        self._sessions = sessions
        self._publisher = publisher
        self._celery = celery
        self._queues = TaskQueues(settings.broker_url)
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._subscriptions: list[ActiveSubscription] = []
        self._subscriptions_at = float("-inf")

    async def serve(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the batch in hand is finished first."""
        while not await self._publisher.wait_connected(1.0):
            if stop.is_set():
                return
        connection = await aio_pika.connect_robust(self._settings.broker_url, timeout=10)
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self._settings.router_prefetch)
            # Declared with its arguments by the publisher's connection (consumers.topology).
            queue = await channel.get_queue(topology.INGEST_QUEUE, ensure=True)
            consumer_tag = await queue.consume(self._inbox.put)
            log.info("router_consuming", queue=topology.INGEST_QUEUE, prefetch=self._settings.router_prefetch)
            await self._batches(stop)
            await queue.cancel(consumer_tag)
        finally:
            # Unacked messages, including any still in the inbox, go back to the queue on close.
            await connection.close()

    async def _batches(self, stop: asyncio.Event) -> None:
        size = self._settings.router_batch_size
        stopping = asyncio.ensure_future(stop.wait())
        while True:
            getting = asyncio.ensure_future(self._inbox.get())
            await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                return
            batch = [getting.result()]
            if self._inbox.empty():
                # Give a burst a moment to fill the batch: one commit for many events.
                await asyncio.sleep(self._settings.router_batch_wait_s)
            while len(batch) < size and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            await self._process_held(batch, stop)

    async def _process_held(self, batch: list[AbstractIncomingMessage], stop: asyncio.Event) -> None:
        delay_s = 0.1
        while True:
            try:
                await self._process(batch)
                return
            except _TRANSIENT as exc:
                log.warning("router_batch_paused", size=len(batch), error=str(exc), retry_in_s=delay_s)
                # Stopping leaves the batch unacked: closing the channel returns it to the queue.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_s)
                if stop.is_set():
                    return
                delay_s = min(delay_s * 2, _RETRY_MAX_S)
            except Exception as exc:
                if len(batch) == 1:
                    await self._dead_letter_and_ack(batch[0], f"the router could not process the event: {exc}")
                    log.exception("router_event_failed", message_id=batch[0].message_id)
                    return
                # Find the poison message: the others must not share its fate.
                for message in batch:
                    await self._process_held([message], stop)
                return

    async def _process(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        received: list[tuple[AbstractIncomingMessage, CloudEvent]] = []
        accepted: dict[tuple[str, str], datetime] = {}
        dead: list[OutgoingMessage] = []
        now = utcnow()
        for message in batch:
            try:
                decoded = decode_events(message.body, dict(message.headers or {}), message.content_type,
                                        message.message_id, message.app_id, self._settings.max_body_bytes)
            except EnvelopeError as exc:
                dead.append(_dead_letter(message, exc.detail))
                with structlog.contextvars.bound_contextvars(message_id=message.message_id):
                    log.warning("event_dead_lettered", reason=exc.detail)
                continue
            received.extend((message, event) for event in decoded)
            # Read once a message: a batch message's events share its stamp.
            if (stamp := _accepted_at(message, now)) is not None:
                for event in decoded:
                    accepted.setdefault((event.source, event.id), stamp)
        events = [(event, event.to_json()) for _, event in received]
        if dead:
            await self._publisher.publish(dead)
        pending: list[PendingDelivery] = []
        duplicates = 0
        if events:
            subscriptions = await self._active_subscriptions()
            pending, duplicates = await asyncio.to_thread(persist_events, self._sessions, events, subscriptions,
                                                          received_at=accepted)
            messages = delivery_task_messages(self._celery, pending, self._settings.webhook_batch_size)
            await self._queues.publish(self._publisher, messages)
        await _ack_through(batch[-1])
        # Counted once acked: a batch retried after a pause is not counted twice.
        EVENTS_ROUTED.inc(len(events) - duplicates)
        EVENTS_DUPLICATE.inc(duplicates)
        EVENTS_DEAD_LETTERED.inc(len(dead))
        log.info("batch_routed", messages=len(batch), events=len(events), dead_lettered=len(dead),
                 duplicates=duplicates, deliveries=len(pending))
        if logging.getLogger(__name__).isEnabledFor(logging.INFO):
            _log_routed(received, pending)

    async def _active_subscriptions(self) -> list[ActiveSubscription]:
        now = time.monotonic()
        if now - self._subscriptions_at > self._settings.subscription_cache_ttl_s:
            self._subscriptions = await asyncio.to_thread(load_active_subscriptions, self._sessions)
            self._subscriptions_at = now
        return self._subscriptions

    async def _dead_letter_and_ack(self, message: AbstractIncomingMessage, reason: str) -> None:
        await self._publisher.publish([_dead_letter(message, reason)])
        await message.ack()
        EVENTS_DEAD_LETTERED.inc()


def _accepted_at(message: AbstractIncomingMessage, now: datetime) -> datetime | None:
    """When the gateway accepted the message's events, from its stamp; None without a readable one
    (another publisher's: its events are stored as received now). A stamp ahead of this clock (the
    gateway's runs fast) counts as now, so no latency comes out negative."""
    try:
        at = datetime.fromisoformat(_text((message.headers or {})[topology.ACCEPTED_AT_HEADER]))
    except (KeyError, ValueError):
        return None
    return min(at, now) if at.tzinfo is not None else None


def _log_routed(received: Sequence[tuple[AbstractIncomingMessage, CloudEvent]],
                pending: Sequence[PendingDelivery]) -> None:
    """One line per event, with its event and message ids bound as the gateway and the workers bind
    theirs, so one event is followed through every process by ``event_id``."""
    delivery_ids: dict[str, list[str]] = {}
    for delivery in pending:
        delivery_ids.setdefault(delivery.event_id, []).append(delivery.delivery_id)
    for message, event in received:
        with structlog.contextvars.bound_contextvars(event_id=event.id, message_id=message.message_id):
            log.info("event_routed", source=event.source, type=event.type,
                     delivery_ids=delivery_ids.get(event.id, []))


def _dead_letter(message: AbstractIncomingMessage, reason: str) -> OutgoingMessage:
    headers: dict[str, Any] = {
        k: v for k, v in (message.headers or {}).items() if isinstance(v, str | int | float | bool)
    }
    headers[topology.ERROR_HEADER] = reason
    headers["x-hookgate-routing-key"] = message.routing_key or ""
    return OutgoingMessage(
        exchange=topology.DEAD_EXCHANGE,
        routing_key=message.routing_key or "",
        body=message.body,
        message_id=message.message_id or new_id(),
        content_type=message.content_type or "application/octet-stream",
        headers=headers,
    )


async def _ack_through(last: AbstractIncomingMessage) -> None:
    # Batches are processed in delivery order on one channel, so one multiple-ack settles the batch.
    try:
        await last.ack(multiple=True)
    except aio_pika.exceptions.ChannelInvalidStateError:
        log.warning("ack_lost_channel_closed", message_id=last.message_id)


async def _main(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    celery = make_celery(settings)
    publisher = ConfirmingPublisher(
        settings.broker_url,
        confirm_timeout_s=settings.publish_timeout_s,
        max_batch=settings.publish_max_batch,
        declare=lambda conn: declare_topology(conn, task_queues()),
        name="router-publisher",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await publisher.start()
    if settings.router_metrics_port:
        serve_metrics(settings.router_metrics_port, settings.host, "router")
    tune_gc()
    try:
        await Router(settings, make_sessionmaker(engine), publisher, celery).serve(stop)
    finally:
        await publisher.close()
        engine.dispose()
        log.info("router_stopped")


def run(settings: Settings) -> None:
    """Run the router until SIGINT or SIGTERM."""
    uvloop.run(_main(settings))
