"""Batch messages: many CloudEvents in one AMQP message, as a JSON array (``application/cloudevents-batch+json``).

An extension of the AMQP contract for bulk publishers (file imports): the body is a JSON array of
events, each as a single message's body would be (structured CloudEvents or plain events), the
media type and shape of the CloudEvents HTTP batch format. The router stores and routes each event
as if it had come alone, deduplicated on (source, id), and dead-letters a batch it cannot decode
whole, with the reason. One AMQP message per event costs the broker and the publisher the same
work whatever the event's size; a batch message of a hundred events costs about as much as one.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from consumers.publisher import OutgoingMessage
from schemas.events import MAX_BATCH_EVENTS, CloudEvent, EnvelopeError, event_from_json
from schemas.topology import EVENTS_EXCHANGE

__all__ = ["BATCH_MEDIA_TYPE", "EVENTS_PER_MESSAGE", "batch_messages", "decode_batch"]

BATCH_MEDIA_TYPE = "application/cloudevents-batch+json"
# Events per batch message from hookgate's own publishers (imports): past about this many, a bigger
# message saves the broker and the publisher little, and the router's transactions grow with it.
EVENTS_PER_MESSAGE = 100


def batch_messages(events: Sequence[CloudEvent], *, max_events: int, max_bytes: int) -> list[OutgoingMessage]:
    """The events as batch messages on hookgate.events: one event type per message, its routing key.

    Each message holds at most ``max_events`` events and, unless a single event is larger, at most
    ``max_bytes`` of body (the router's limit). Its ``message_id`` names the first event and the count.
    """
    by_type: dict[str, list[CloudEvent]] = {}
    for event in events:
        by_type.setdefault(event.type, []).append(event)
    messages: list[OutgoingMessage] = []
    for event_type, group in by_type.items():
        bodies: list[bytes] = []
        first_id, size = "", 1
        for event in group:
            body = event.to_json()
            # The size counts the brackets and one comma per event: it is the message body's.
            if bodies and (len(bodies) >= max_events or size + len(body) + 1 > max_bytes):
                messages.append(_message(event_type, bodies, first_id))
                bodies, size = [], 1
            if not bodies:
                first_id = event.id
            bodies.append(body)
            size += len(body) + 1
        messages.append(_message(event_type, bodies, first_id))
    return messages


def _message(event_type: str, bodies: list[bytes], first_id: str) -> OutgoingMessage:
    return OutgoingMessage(exchange=EVENTS_EXCHANGE, routing_key=event_type, body=b"[" + b",".join(bodies) + b"]",
                           message_id=f"batch:{first_id}+{len(bodies)}", content_type=BATCH_MEDIA_TYPE)


def decode_batch(body: bytes, *, message_id: str | None, default_source: str) -> list[CloudEvent]:
    """Every event of a batch message, or ``EnvelopeError`` naming the first that is not one.

    An event without an id gets ``MESSAGE_ID:INDEX`` (its place in the array, from 0), so a
    redelivered batch gives the same ids; without a ``message_id`` either, a fresh one.
    """
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"the batch is not JSON: {exc}") from exc
    if not isinstance(items, list) or not items:
        raise EnvelopeError("a batch must be a non-empty JSON array of events")
    if len(items) > MAX_BATCH_EVENTS:
        raise EnvelopeError(f"a batch holds at most {MAX_BATCH_EVENTS} events, not {len(items)}")
    events: list[CloudEvent] = []
    for index, item in enumerate(items):
        try:
            events.append(event_from_json(item, default_source=default_source,
                                          default_id=f"{message_id}:{index}" if message_id else None))
        except EnvelopeError as exc:
            raise EnvelopeError(f"event {index} of the batch: {exc.detail}", exc.errors) from exc
    return events
