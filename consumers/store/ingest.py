"""The router's write path: persist a batch of events and their deliveries in one transaction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, Insert, insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import utcnow
from consumers.store.errors import translate_errors
from consumers.store.models import Delivery, Event, Subscription
from consumers.topics import topic_matches
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.ids import new_id

__all__ = [
    "ActiveSubscription",
    "PendingDelivery",
    "load_active_subscriptions",
    "pending_deliveries",
    "persist_events",
]


@dataclass(frozen=True, slots=True)
class ActiveSubscription:
    id: str
    channel: str
    event_types: tuple[str, ...]
    options: dict[str, object]

    def matches(self, event_type: str) -> bool:
        return any(topic_matches(pattern, event_type) for pattern in self.event_types)


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    """A delivery whose task must be enqueued: what the router needs to route it, ids only."""

    delivery_id: str
    event_id: str
    subscription: ActiveSubscription


def load_active_subscriptions(sessions: sessionmaker[Session]) -> list[ActiveSubscription]:
    with sessions() as session:
        rows = session.execute(
            select(Subscription.id, Subscription.channel, Subscription.event_types, Subscription.options).where(
                Subscription.enabled.is_(True), Subscription.deleted_at.is_(None)
            )
        ).all()
    return [ActiveSubscription(r.id, r.channel, tuple(r.event_types), r.options or {}) for r in rows]


def pending_deliveries(sessions: sessionmaker[Session], delivery_ids: Sequence[str]) -> list[PendingDelivery]:
    """These deliveries as the router would enqueue them (with their event and subscription), to enqueue again."""
    with translate_errors("reading deliveries to enqueue"), sessions() as session:
        rows = session.execute(
            select(Delivery.id, Event.id.label("event_id"), Subscription.id.label("subscription_id"),
                   Subscription.channel, Subscription.event_types, Subscription.options)
            .join(Event, Event.pk == Delivery.event_pk)
            .join(Subscription, Subscription.id == Delivery.subscription_id)
            .where(Delivery.id.in_(list(delivery_ids)))
        ).all()
    return [PendingDelivery(r.id, r.event_id, ActiveSubscription(r.subscription_id, r.channel, tuple(r.event_types),
                                                                 r.options or {}))
            for r in rows]


def _insert_ignoring_duplicates(engine: Engine) -> Insert:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(Event).on_conflict_do_nothing(index_elements=["source", "id"])


def persist_events(
    sessions: sessionmaker[Session],
    events: Sequence[tuple[CloudEvent, bytes]],
    subscriptions: Sequence[ActiveSubscription],
    *,
    received_at: Mapping[tuple[str, str], datetime] | None = None,
) -> tuple[list[PendingDelivery], int]:
    """Store new events with one delivery per matching subscription; return what to enqueue and the duplicates.

    ``received_at`` holds when the gateway accepted events, by (source, id); the others are stamped now.

    Duplicates of (source, id) are not stored again. Their deliveries that never started are
    returned once more: a router that crashed between this commit and the task publish left them
    without a task, and the delivery task is idempotent, so enqueueing one twice is harmless.
    """
    now = utcnow()
    unique: dict[tuple[str, str], tuple[CloudEvent, bytes]] = {}
    for event, body in events:
        unique.setdefault((event.source, event.id), (event, body))
    accepted = received_at or {}
    rows = [_event_row(event, body, accepted.get(key, now)) for key, (event, body) in unique.items()]
    with sessions.begin() as session:
        engine = session.get_bind()
        assert isinstance(engine, Engine)
        inserted = session.execute(
            _insert_ignoring_duplicates(engine).returning(Event.pk, Event.source, Event.id), rows
        ).all()
        new_keys = {(r.source, r.id): r.pk for r in inserted}
        pending: list[PendingDelivery] = []
        delivery_rows: list[dict[str, object]] = []
        for key, pk in new_keys.items():
            event = unique[key][0]
            for subscription in subscriptions:
                if subscription.matches(event.type):
                    delivery_id = new_id()
                    delivery_rows.append(_delivery_row(delivery_id, pk, subscription.id, now))
                    pending.append(PendingDelivery(delivery_id, event.id, subscription))
        if delivery_rows:
            session.execute(insert(Delivery), delivery_rows)
        duplicates = [key for key in unique if key not in new_keys]
        if duplicates:
            pending.extend(_unstarted_deliveries(session, duplicates, subscriptions))
    return pending, len(events) - len(new_keys)


def _unstarted_deliveries(session: Session, keys: list[tuple[str, str]],
                          subscriptions: Sequence[ActiveSubscription]) -> list[PendingDelivery]:
    by_id = {s.id: s for s in subscriptions}
    rows = session.execute(
        select(Delivery.id, Delivery.subscription_id, Event.id.label("event_id"))
        .join(Event, Event.pk == Delivery.event_pk)
        .where(
            tuple_(Event.source, Event.id).in_(keys),
            Delivery.status == DeliveryStatus.PENDING.value,
            Delivery.attempts_count == 0,
        )
    ).all()
    return [PendingDelivery(r.id, r.event_id, by_id[r.subscription_id]) for r in rows if r.subscription_id in by_id]


def _event_row(event: CloudEvent, body: bytes, received_at: datetime) -> dict[str, object]:
    return {
        "pk": new_id(),
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "subject": event.subject,
        "time": event.time,
        "body": body.decode(),
        "received_at": received_at,
    }


def _delivery_row(delivery_id: str, event_pk: str, subscription_id: str, now: datetime) -> dict[str, object]:
    return {
        "id": delivery_id,
        "event_pk": event_pk,
        "subscription_id": subscription_id,
        "status": DeliveryStatus.PENDING.value,
        "attempts_count": 0,
        "created_at": now,
        "updated_at": now,
    }
