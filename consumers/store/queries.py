"""Read-only questions the API asks the store: an event with its deliveries, and is the store up."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.errors import translate_errors
from consumers.store.models import Attempt, Delivery, Event
from schemas.deliveries import AttemptOut, DeliveryFilter, DeliveryOut, DeliveryStatus, EventDeliveries

__all__ = ["AmbiguousEventError", "delivery_event", "find_event", "get_delivery", "list_deliveries", "ping"]

# How many sources an ambiguous answer lists.
_MAX_SOURCES_SHOWN = 10


class AmbiguousEventError(LookupError):
    """Several events share this id (from different sources); the caller must name the source."""

    def __init__(self, event_id: str, sources: list[str]) -> None:
        super().__init__(f"{len(sources)} or more events have the id {event_id!r}")
        self.event_id = event_id
        self.sources = sources


def delivery_event(sessions: sessionmaker[Session], delivery_id: str) -> dict[str, Any] | None:
    """The structured CloudEvent a delivery carries, or None if there is no such delivery."""
    with translate_errors("reading a delivery's event"), sessions() as session:
        body = session.execute(
            select(Event.body).join(Delivery, Delivery.event_pk == Event.pk).where(Delivery.id == delivery_id)
        ).scalar_one_or_none()
    return None if body is None else orjson.loads(body)


def find_event(sessions: sessionmaker[Session], event_id: str, *, source: str | None = None) -> EventDeliveries | None:
    """The event (source, id), or the only event with ``event_id`` when no source is given; None if none."""
    query = select(Event.pk, Event.source, Event.type, Event.body, Event.received_at).where(Event.id == event_id)
    if source is not None:
        query = query.where(Event.source == source)
    with translate_errors("reading an event"), sessions() as session:
        events = session.execute(query.order_by(Event.source).limit(_MAX_SOURCES_SHOWN)).all()
        if len(events) > 1:
            raise AmbiguousEventError(event_id, [row.source for row in events])
        if not events:
            return None
        event = events[0]
        deliveries = session.execute(
            select(Delivery).where(Delivery.event_pk == event.pk).order_by(Delivery.created_at, Delivery.id)
        ).scalars().all()
        attempts = session.execute(
            select(Attempt)
            .join(Delivery, Attempt.delivery_id == Delivery.id)
            .where(Delivery.event_pk == event.pk)
            .order_by(Attempt.delivery_id, Attempt.number)
        ).scalars().all()
    by_delivery: defaultdict[str, list[AttemptOut]] = defaultdict(list)
    for attempt in attempts:
        by_delivery[attempt.delivery_id].append(_attempt_out(attempt))
    return EventDeliveries(
        event=orjson.loads(event.body),
        received_at=event.received_at,
        deliveries=[_delivery_out(d, event_id, event.type, by_delivery[d.id]) for d in deliveries],
    )


def _attempt_out(attempt: Attempt) -> AttemptOut:
    return AttemptOut(
        number=attempt.number, started_at=attempt.started_at, duration_ms=attempt.duration_ms,
        status_code=attempt.status_code, error=attempt.error, response_headers=attempt.response_headers,
        response_body=attempt.response_body,
    )


def _delivery_out(d: Delivery, event_id: str, event_type: str, attempts: list[AttemptOut] | None) -> DeliveryOut:
    return DeliveryOut(
        id=d.id, subscription_id=d.subscription_id, event_id=event_id, event_type=event_type,
        status=DeliveryStatus(d.status), attempts_count=d.attempts_count, created_at=d.created_at,
        updated_at=d.updated_at, next_attempt_at=d.next_attempt_at, last_error=d.last_error, attempts=attempts,
    )


_DELIVERY_WITH_EVENT = select(Delivery, Event.id.label("event_id"), Event.type.label("event_type")).join(
    Event, Event.pk == Delivery.event_pk
)


def list_deliveries(sessions: sessionmaker[Session], where: DeliveryFilter) -> tuple[list[DeliveryOut], str | None]:
    """A page of deliveries matching the filter, newest first, and the cursor of the next page."""
    query = _DELIVERY_WITH_EVENT.order_by(Delivery.id.desc()).limit(where.limit + 1)
    if where.status is not None:
        query = query.where(Delivery.status == where.status.value)
    if where.subscription_id is not None:
        query = query.where(Delivery.subscription_id == where.subscription_id)
    if where.event_type is not None:
        query = query.where(Event.type == where.event_type)
    if where.since is not None:
        query = query.where(Delivery.created_at >= where.since)
    if where.before is not None:
        query = query.where(Delivery.id < where.before)
    with translate_errors("listing deliveries"), sessions() as session:
        rows = session.execute(query).all()
    page = [_delivery_out(row.Delivery, row.event_id, row.event_type, None) for row in rows[:where.limit]]
    # Ids are UUIDv7: id order is creation order, and the last id shown is a stable cursor.
    return page, page[-1].id if len(rows) > where.limit else None


def get_delivery(sessions: sessionmaker[Session], delivery_id: str) -> DeliveryOut | None:
    """One delivery with every attempt, or None."""
    with translate_errors("reading a delivery"), sessions() as session:
        row = session.execute(_DELIVERY_WITH_EVENT.where(Delivery.id == delivery_id)).first()
        if row is None:
            return None
        attempts = session.execute(
            select(Attempt).where(Attempt.delivery_id == delivery_id).order_by(Attempt.number, Attempt.id)
        ).scalars().all()
    return _delivery_out(row.Delivery, row.event_id, row.event_type, [_attempt_out(a) for a in attempts])


def ping(sessions: sessionmaker[Session]) -> None:
    """Ask the store ``SELECT 1``; raises ``StoreError`` when it does not answer."""
    with translate_errors("pinging the store"), sessions() as session:
        session.execute(text("SELECT 1"))
