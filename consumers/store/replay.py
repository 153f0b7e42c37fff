"""Sending finished deliveries again on demand: one (``retry``) or a subscription's dead ones (``recover``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import utcnow
from consumers.store.errors import translate_errors
from consumers.store.models import Delivery, Event, Subscription
from schemas.deliveries import REPLAYABLE_STATUSES, DeliveryStatus

__all__ = ["Replayed", "RetryRefusal", "recover_dead", "retry_delivery"]

_REPLAYABLE = [status.value for status in REPLAYABLE_STATUSES]


class RetryRefusal(StrEnum):
    """Why a delivery cannot be sent again now."""

    NOT_FOUND = "there is no such delivery"
    OPEN = "the delivery is still pending or retrying; it will be sent on its schedule"
    CANCELLED = "the delivery was cancelled with its subscription"
    SUBSCRIPTION_DISABLED = "its subscription is disabled; enable it first"


@dataclass(frozen=True, slots=True)
class Replayed:
    delivery_id: str
    channel: str


def _reopen(now: datetime) -> dict[str, object]:
    # A fresh run of the retry schedule: attempts keep their numbers, the schedule counts from here.
    return {"status": DeliveryStatus.PENDING.value, "attempts_base": Delivery.attempts_count,
            "next_attempt_at": None, "lease_until": None, "held_since": None, "updated_at": now}


def retry_delivery(sessions: sessionmaker[Session], delivery_id: str) -> Replayed | RetryRefusal:
    """Make a dead or succeeded delivery pending again, for the caller to enqueue."""
    now = utcnow()
    with translate_errors("retrying a delivery"), sessions.begin() as session:
        row = session.execute(
            select(Delivery.status, Subscription.channel, Subscription.enabled, Subscription.deleted_at)
            .join(Subscription, Subscription.id == Delivery.subscription_id)
            .where(Delivery.id == delivery_id)
        ).first()
        if row is None:
            return RetryRefusal.NOT_FOUND
        if row.status == DeliveryStatus.CANCELLED.value or row.deleted_at is not None:
            return RetryRefusal.CANCELLED
        if row.status not in _REPLAYABLE:
            return RetryRefusal.OPEN
        if not row.enabled:
            return RetryRefusal.SUBSCRIPTION_DISABLED
        reopened = session.execute(
            update(Delivery).where(Delivery.id == delivery_id, Delivery.status.in_(_REPLAYABLE)).values(_reopen(now))
        ).rowcount
    # Another retry of the same delivery won the race: it is open now either way.
    return Replayed(delivery_id, row.channel) if reopened == 1 else RetryRefusal.OPEN


def recover_dead(sessions: sessionmaker[Session], subscription_id: str, since: datetime,
                 *, chunk: int = 1000) -> Iterator[list[str]]:
    """Reopen the subscription's dead deliveries of events received since ``since``, ``chunk`` at a time.

    Each chunk is committed before it is yielded, for the caller to enqueue; a chunk that is never
    enqueued (a crash) stays pending for the stuck-delivery sweep.
    """
    while True:
        now = utcnow()
        with translate_errors("recovering deliveries"), sessions.begin() as session:
            ids = list(session.execute(
                select(Delivery.id)
                .join(Event, Event.pk == Delivery.event_pk)
                .where(and_(Delivery.subscription_id == subscription_id,
                            Delivery.status == DeliveryStatus.DEAD.value, Event.received_at >= since))
                .order_by(Delivery.id)
                .limit(chunk)
            ).scalars())
            if not ids:
                return
            session.execute(update(Delivery).where(Delivery.id.in_(ids), Delivery.status == DeliveryStatus.DEAD.value)
                            .values(_reopen(now)))
        yield ids
