"""Test helpers: subscriptions and deliveries written straight into the store, and waiting on them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import utcnow
from consumers.store.models import Delivery, Event, Subscription
from schemas.events import CloudEvent
from schemas.ids import new_id

__all__ = ["add_delivery", "add_event_delivery", "add_subscription", "statuses", "wait_for"]


def add_subscription(sessions: sessionmaker[Session], url: str, secret: str, **columns: Any) -> str:
    now = utcnow()
    subscription_id = new_id()
    with sessions.begin() as session:
        session.add(Subscription(id=subscription_id, channel="webhook", event_types=["order.*"], url=url,
                                 secret=secret, description="", enabled=True, options={}, created_at=now,
                                 updated_at=now, **columns))
    return subscription_id


def add_event_delivery(sessions: sessionmaker[Session], subscription_id: str, data: Any,
                       event_type: str = "order.paid", source: str = "tests/email") -> tuple[CloudEvent, str]:
    """An event and one pending delivery of it to the subscription; the event and the delivery id."""
    now = utcnow()
    event = CloudEvent(id=new_id(), source=source, type=event_type, data=data, time=now)
    event_pk, delivery_id = new_id(), new_id()
    with sessions.begin() as session:
        session.add(Event(pk=event_pk, id=event.id, source=event.source, type=event.type, time=event.time,
                          body=event.to_json().decode(), received_at=now))
        session.flush()
        session.add(Delivery(id=delivery_id, event_pk=event_pk, subscription_id=subscription_id, status="pending",
                             attempts_count=0, created_at=now, updated_at=now))
    return event, delivery_id


def add_delivery(sessions: sessionmaker[Session], subscription_id: str) -> str:
    return add_event_delivery(sessions, subscription_id, {"n": 1}, "order.created", "tests/endpoints")[1]


def statuses(sessions: sessionmaker[Session], subscription_id: str) -> dict[str, int]:
    with sessions() as session:
        return dict(session.execute(
            select(Delivery.status, func.count()).where(Delivery.subscription_id == subscription_id)
            .group_by(Delivery.status)).all())


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
