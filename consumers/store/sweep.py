"""Open deliveries that nothing will send: left ``pending`` (or a retry overdue) with no task in the broker."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import utcnow
from consumers.store.errors import translate_errors
from consumers.store.models import Delivery, Subscription
from schemas.deliveries import OPEN_STATUSES

__all__ = ["take_stuck"]

_OPEN = [status.value for status in OPEN_STATUSES]


def take_stuck(sessions: sessionmaker[Session], stuck_after_s: float, limit: int) -> list[str]:
    """Mark up to ``limit`` stranded deliveries as looked at, and return their ids (sorted) to enqueue.

    Stranded: open, untouched (``updated_at``) and due (``next_attempt_at``) for ``stuck_after_s``,
    not leased (a send in flight is never taken; an email left ``sending`` by a task killed at its
    hard limit is taken once its lease is over), not held by its endpoint (a release sends those), of
    a live subscription. A crash between the router's commit and its publish,
    or a 503 from the broker on retry or recover, leaves exactly such rows. Taking one sets its
    ``updated_at``, so the next sweep leaves it alone for another ``stuck_after_s`` while its task
    waits in the queue; and should the task meet a send after all, the claim's lease makes it a no-op.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=stuck_after_s)
    candidates = (
        select(Delivery.id)
        .join(Subscription, Subscription.id == Delivery.subscription_id)
        .where(
            Delivery.status.in_(_OPEN),
            Delivery.updated_at < cutoff,
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at < cutoff),
            or_(Delivery.lease_until.is_(None), Delivery.lease_until < now),
            Delivery.held_since.is_(None),
            Subscription.deleted_at.is_(None),
        )
        .order_by(Delivery.updated_at)
        .limit(limit)
    )
    with translate_errors("sweeping stuck deliveries"), sessions.begin() as session:
        ids = list(session.execute(candidates).scalars())
        if not ids:
            return []
        # The conditions again: a worker may have claimed one since (PostgreSQL reads without the lock).
        return sorted(session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.status.in_(_OPEN), Delivery.updated_at < cutoff,
                   Delivery.held_since.is_(None), or_(Delivery.lease_until.is_(None), Delivery.lease_until < now))
            .values(updated_at=now)
            .returning(Delivery.id)
        ).scalars())
