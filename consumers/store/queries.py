"""Read-only questions the API asks the store: an event with its deliveries, and is the store up."""

from __future__ import annotations

from collections import defaultdict

import orjson
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.errors import translate_errors
from consumers.store.models import Attempt, Delivery, Event
from schemas.deliveries import AttemptOut, DeliveryOut, DeliveryStatus, EventDeliveries

__all__ = ["AmbiguousEventError", "find_event", "ping"]

# How many sources an ambiguous answer lists.
_MAX_SOURCES_SHOWN = 10


class AmbiguousEventError(LookupError):
    """Several events share this id (from different sources); the caller must name the source."""

    def __init__(self, event_id: str, sources: list[str]) -> None:
        super().__init__(f"{len(sources)} or more events have the id {event_id!r}")
        self.event_id = event_id
        self.sources = sources


def find_event(sessions: sessionmaker[Session], event_id: str, *, source: str | None = None) -> EventDeliveries | None:
    """The event (source, id), or the only event with ``event_id`` when no source is given; None if none."""
    query = select(Event.pk, Event.source, Event.body, Event.received_at).where(Event.id == event_id)
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
        by_delivery[attempt.delivery_id].append(
            AttemptOut(
                number=attempt.number,
                started_at=attempt.started_at,
                duration_ms=attempt.duration_ms,
                status_code=attempt.status_code,
                error=attempt.error,
            )
        )
    return EventDeliveries(
        event=orjson.loads(event.body),
        received_at=event.received_at,
        deliveries=[
            DeliveryOut(
                id=d.id,
                subscription_id=d.subscription_id,
                status=DeliveryStatus(d.status),
                attempts_count=d.attempts_count,
                created_at=d.created_at,
                updated_at=d.updated_at,
                last_error=d.last_error,
                attempts=by_delivery[d.id],
            )
            for d in deliveries
        ],
    )


def ping(sessions: sessionmaker[Session]) -> None:
    """Ask the store ``SELECT 1``; raises ``StoreError`` when it does not answer."""
    with translate_errors("pinging the store"), sessions() as session:
        session.execute(text("SELECT 1"))
