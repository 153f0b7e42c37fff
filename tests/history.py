"""Test helpers: events, deliveries and attempts written into the store with the times a test chooses."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from consumers.store.models import Attempt, Delivery, Event
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.ids import new_id

__all__ = ["add_event", "add_past_delivery"]


def add_event(sessions: sessionmaker[Session], received_at: datetime, source: str = "tests/history") -> str:
    """An event received at ``received_at``; returns its primary key."""
    event = CloudEvent(id=new_id(), source=source, type="order.created", data={"n": 1}, time=received_at)
    pk = new_id()
    with sessions.begin() as session:
        session.add(Event(pk=pk, id=event.id, source=event.source, type=event.type, time=event.time,
                          body=event.to_json().decode(), received_at=received_at))
    return pk


def add_past_delivery(sessions: sessionmaker[Session], event_pk: str, subscription_id: str, status: DeliveryStatus,
                      updated_at: datetime, attempts: Sequence[tuple[datetime, float, int | None]] = (),
                      **columns: Any) -> str:
    """A delivery last changed at ``updated_at`` with these attempts (started_at, duration_ms, status_code)."""
    delivery_id = new_id()
    with sessions.begin() as session:
        session.add(Delivery(id=delivery_id, event_pk=event_pk, subscription_id=subscription_id, status=status.value,
                             attempts_count=len(attempts), created_at=updated_at, updated_at=updated_at, **columns))
        session.flush()
        for number, (started_at, duration_ms, status_code) in enumerate(attempts, start=1):
            session.add(Attempt(delivery_id=delivery_id, number=number, started_at=started_at,
                                duration_ms=duration_ms, status_code=status_code,
                                error=None if status_code is not None and 200 <= status_code < 300 else "failed"))
    return delivery_id
