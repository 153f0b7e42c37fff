"""Subscriptions in the store: create, page through, change, and soft-delete them."""

from __future__ import annotations

import base64
import os
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import utcnow
from consumers.store.errors import translate_errors
from consumers.store.models import Delivery, EndpointHealth, Subscription
from schemas.deliveries import OPEN_STATUSES, DeliveryStatus
from schemas.ids import new_id
from schemas.subscriptions import (
    CHANNEL_FIELDS,
    Channel,
    PayloadFormat,
    SubscriptionCreate,
    SubscriptionOut,
    SubscriptionSecret,
    SubscriptionUpdate,
    channel_options,
)

__all__ = [
    "NoSecretError",
    "create_subscription",
    "delete_subscription",
    "generate_secret",
    "get_secret",
    "get_subscription",
    "list_subscriptions",
    "rotate_secret",
    "update_subscription",
]


class NoSecretError(Exception):
    """The subscription signs nothing (it is not a webhook subscription), so it has no secret to show or rotate."""


def generate_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def _out(row: Subscription, *, with_secret: bool) -> SubscriptionOut:
    return SubscriptionOut(
        id=row.id,
        channel=Channel(row.channel),
        event_types=list(row.event_types),
        url=row.url,
        description=row.description,
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
        retry_schedule=list(row.retry_schedule) if row.retry_schedule is not None else None,
        payload_format=PayloadFormat(row.payload_format),
        rate_limit_per_s=row.rate_limit_per_s,
        max_in_flight=row.max_in_flight,
        options=dict(row.options or {}),
        created_at=row.created_at,
        updated_at=row.updated_at,
        secret=row.secret if with_secret else None,
    )


def _live(session: Session, subscription_id: str) -> Subscription | None:
    return session.execute(
        select(Subscription).where(Subscription.id == subscription_id, Subscription.deleted_at.is_(None))
    ).scalar_one_or_none()


def create_subscription(
    sessions: sessionmaker[Session], data: SubscriptionCreate, *, owner_key_id: str | None
) -> SubscriptionOut:
    """Store a new subscription; the answer includes its secret (generated unless given)."""
    now = utcnow()
    row = Subscription(
        id=new_id(),
        channel=data.channel.value,
        event_types=list(data.event_types),
        url=data.url,
        secret=data.secret or (generate_secret() if data.channel is Channel.WEBHOOK else None),
        description=data.description,
        enabled=data.enabled,
        retry_schedule=data.retry_schedule,
        payload_format=data.payload_format.value,
        rate_limit_per_s=data.rate_limit_per_s,
        max_in_flight=data.max_in_flight,
        options=dict(data.options),
        owner_key_id=owner_key_id,
        created_at=now,
        updated_at=now,
        deleted_at=None,
    )
    with translate_errors("creating a subscription"), sessions.begin() as session:
        session.add(row)
    return _out(row, with_secret=True)


def list_subscriptions(
    sessions: sessionmaker[Session], *, limit: int, after: str | None
) -> tuple[list[SubscriptionOut], str | None]:
    """Up to ``limit`` live subscriptions with ids after ``after``, without secrets, and the next cursor."""
    query = select(Subscription).where(Subscription.deleted_at.is_(None)).order_by(Subscription.id).limit(limit + 1)
    if after is not None:
        query = query.where(Subscription.id > after)
    with translate_errors("listing subscriptions"), sessions() as session:
        rows = list(session.execute(query).scalars())
    page = [_out(row, with_secret=False) for row in rows[:limit]]
    # Ids are UUIDv7, so id order is creation order and the last id is a stable cursor.
    next_after = page[-1].id if len(rows) > limit else None
    return page, next_after


def get_subscription(
    sessions: sessionmaker[Session], subscription_id: str, *, with_secret: bool = False
) -> SubscriptionOut | None:
    """The live subscription with this id, or None; its secret only when asked for."""
    with translate_errors("reading a subscription"), sessions() as session:
        row = _live(session, subscription_id)
    return None if row is None else _out(row, with_secret=with_secret)


def update_subscription(
    sessions: sessionmaker[Session], subscription_id: str, changes: SubscriptionUpdate
) -> SubscriptionOut | None:
    """Apply the fields present in ``changes``; None if there is no such live subscription.

    Channel fields are merged into ``options`` and checked against the subscription's channel: a
    pydantic ``ValidationError`` if they do not fit it, and nothing is changed.
    """
    channel_changes = changes.channel_changes()
    fields = {name: value for name, value in changes.model_dump(exclude_unset=True).items()
              if name not in CHANNEL_FIELDS}
    with translate_errors("updating a subscription"), sessions.begin() as session:
        row = _live(session, subscription_id)
        if row is None:
            return None
        if channel_changes:
            # Checked against the stored channel in this transaction (pydantic's ValidationError rolls it back);
            # a null (reply_to) removes the field.
            merged = {name: value for name, value in {**(row.options or {}), **channel_changes}.items()
                      if value is not None}
            row.options = channel_options(Channel(row.channel), merged)
            row.updated_at = utcnow()
        if fields:
            for name, value in fields.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
        if fields.get("enabled") is True:
            # Enabled again by a person: whatever disabled it, and its endpoint's record, start afresh.
            row.disabled_reason = None
            session.execute(delete(EndpointHealth).where(EndpointHealth.subscription_id == subscription_id))
    return _out(row, with_secret=False)


def get_secret(sessions: sessionmaker[Session], subscription_id: str) -> SubscriptionSecret | None:
    """The live subscription's current secret and its predecessor's expiry, or None if not found."""
    with translate_errors("reading a subscription's secret"), sessions() as session:
        row = _live(session, subscription_id)
        if row is None:
            return None
        if row.secret is None:
            raise NoSecretError(subscription_id)
        return SubscriptionSecret(secret=row.secret, previous_secret_expires_at=_still_valid(row))


def rotate_secret(sessions: sessionmaker[Session], subscription_id: str, new_secret: str | None, *,
                  grace_s: float) -> SubscriptionSecret | None:
    """Make ``new_secret`` (or a generated one) current; the old one keeps signing for ``grace_s``.

    Only the secret just replaced stays valid: rotating twice within a grace period drops the oldest.
    None if there is no such live subscription; NoSecretError if it has no secret.
    """
    now = utcnow()
    with translate_errors("rotating a subscription's secret"), sessions.begin() as session:
        row = _live(session, subscription_id)
        if row is None:
            return None
        if row.secret is None:
            raise NoSecretError(subscription_id)
        row.previous_secret = row.secret if grace_s > 0 else None
        row.previous_secret_expires_at = now + timedelta(seconds=grace_s) if grace_s > 0 else None
        row.secret = new_secret or generate_secret()
        row.updated_at = now
        return SubscriptionSecret(secret=row.secret, previous_secret_expires_at=_still_valid(row))


def _still_valid(row: Subscription) -> datetime | None:
    expires_at = row.previous_secret_expires_at
    return expires_at if row.previous_secret and expires_at and expires_at > utcnow() else None


def delete_subscription(sessions: sessionmaker[Session], subscription_id: str) -> int | None:
    """Soft-delete the subscription and cancel its open deliveries; their count, or None if not found."""
    now = utcnow()
    with translate_errors("deleting a subscription"), sessions.begin() as session:
        deleted = session.execute(
            update(Subscription)
            .where(Subscription.id == subscription_id, Subscription.deleted_at.is_(None))
            .values(deleted_at=now, enabled=False, updated_at=now)
        )
        if deleted.rowcount != 1:
            return None
        cancelled = session.execute(
            update(Delivery)
            .where(Delivery.subscription_id == subscription_id, Delivery.status.in_([s.value for s in OPEN_STATUSES]))
            .values(status=DeliveryStatus.CANCELLED.value, updated_at=now, last_error="subscription deleted")
        )
    return cancelled.rowcount
