"""Test helpers for the email and task channels: their subscriptions and deliveries in the store, read back."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import utcnow
from consumers.store.models import Attempt, Delivery, Subscription
from schemas.ids import new_id
from schemas.subscriptions import SubscriptionCreate
from tests.seeding import add_event_delivery

__all__ = ["TEMPLATE", "add_channel_subscription", "add_event_delivery", "email_fields", "load", "wait_status"]

TEMPLATE = {
    "subject": "Order {{ data.order_id }} paid",
    "text": "Hello {{ data.customer.name }}, order {{ data.order_id }} ({{ type }}, {{ id }}) is paid.",
    "html": "<p>Hello <b>{{ data.customer.name }}</b>, order {{ data.order_id }} is paid.</p>",
}


def email_fields(**overrides: Any) -> dict[str, Any]:
    """The body of an email subscription as a client posts it."""
    fields: dict[str, Any] = {"channel": "email", "event_types": ["order.*"], "to": "/data/customer/email",
                              "from": "shop@example.com", "reply_to": "help@example.com", "template": TEMPLATE}
    fields.update(overrides)
    return fields


def add_channel_subscription(sessions: sessionmaker[Session], fields: dict[str, Any], **columns: Any) -> str:
    """Store a subscription from its API body (validated as the API validates it); returns its id."""
    data = SubscriptionCreate.model_validate(fields)
    now = utcnow()
    subscription_id = new_id()
    with sessions.begin() as session:
        session.add(Subscription(id=subscription_id, channel=data.channel.value, event_types=data.event_types,
                                 url=None, secret=None, description="", enabled=True, options=data.options,
                                 created_at=now, updated_at=now, **columns))
    return subscription_id


def load(sessions: sessionmaker[Session], delivery_id: str) -> tuple[Delivery, list[Attempt]]:
    with sessions() as session:
        # The delivery first: the attempts read after it are at least as new (they commit together), so a
        # delivery seen finished comes with its last attempt.
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        attempts = list(session.scalars(select(Attempt).where(Attempt.delivery_id == delivery_id)
                                        .order_by(Attempt.number)))
        return delivery, attempts


def wait_status(sessions: sessionmaker[Session], delivery_id: str, status: str,
                timeout_s: float = 20.0) -> tuple[Delivery, list[Attempt]]:
    """Wait until the delivery reaches ``status``; the delivery and its attempts then."""
    deadline = time.monotonic() + timeout_s
    while True:
        delivery, attempts = load(sessions, delivery_id)
        if delivery.status == status:
            return delivery, attempts
        if time.monotonic() > deadline:
            raise AssertionError(f"delivery {delivery_id} is {delivery.status}, not {status}, after {timeout_s} s: "
                                 f"{[(a.number, a.status_code, a.error) for a in attempts]}")
        time.sleep(0.05)
