"""The weekly report's figures, computed by the database: counts and nearest-rank percentiles per subscription."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float, and_, case, cast, extract, func, literal, select
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.errors import translate_errors
from consumers.store.models import Attempt, Delivery, Event, Subscription
from schemas.deliveries import DeliveryStatus
from schemas.reports import ReportRow, WeeklyReport

__all__ = ["weekly_report"]

_PERCENTILES = {"p50_ms": 0.50, "p99_ms": 0.99}


def _seconds_between(later: Any, earlier: Any, dialect: str) -> Any:
    """``later - earlier`` in seconds, as each engine spells it (SQLite keeps datetimes as text)."""
    if dialect == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return extract("epoch", later - earlier)


def weekly_report(sessions: sessionmaker[Session], start: datetime, end: datetime) -> WeeklyReport:
    """Per subscription (deleted ones left out), over attempts started in ``[start, end)``.

    ``delivered``: successful (2xx) attempts; ``failed``: the other attempts; ``dead``: deliveries
    that ended dead in the period; ``p50_ms``/``p99_ms``: nearest-rank percentiles of the delivered
    ones' latency, from the event's arrival to the end of the successful attempt.
    """
    with translate_errors("computing the weekly report"), sessions() as session:
        dialect = session.get_bind().dialect.name
        ok = and_(Attempt.status_code >= 200, Attempt.status_code < 300)
        attempts = (
            select(
                Delivery.subscription_id.label("subscription_id"),
                case((ok, 1), else_=0).label("ok"),
                (_seconds_between(Attempt.started_at, Event.received_at, dialect) * 1000.0
                 + Attempt.duration_ms).label("latency_ms"),
            )
            .join(Delivery, Delivery.id == Attempt.delivery_id)
            .join(Event, Event.pk == Delivery.event_pk)
            .where(Attempt.started_at >= start, Attempt.started_at < end)
            .cte("period_attempts")
        )
        # Rank the successful attempts' latencies within their subscription; the percentile p is the
        # smallest latency whose rank reaches p * n.
        delivered = select(
            attempts.c.subscription_id, attempts.c.latency_ms,
            func.row_number().over(partition_by=attempts.c.subscription_id,
                                   order_by=attempts.c.latency_ms).label("rank"),
            func.count().over(partition_by=attempts.c.subscription_id).label("n"),
        ).where(attempts.c.ok == 1).subquery("ranked")
        latency = select(
            delivered.c.subscription_id,
            func.max(delivered.c.n).label("delivered"),
            *(func.min(case((delivered.c.rank >= cast(delivered.c.n, Float) * literal(p), delivered.c.latency_ms)))
              .label(name) for name, p in _PERCENTILES.items()),
        ).group_by(delivered.c.subscription_id).subquery("latency")
        failed = (
            select(attempts.c.subscription_id, func.count().label("failed"))
            .where(attempts.c.ok == 0).group_by(attempts.c.subscription_id).subquery("failed")
        )
        dead = (
            select(Delivery.subscription_id, func.count().label("dead"))
            .where(Delivery.status == DeliveryStatus.DEAD.value, Delivery.updated_at >= start,
                   Delivery.updated_at < end)
            .group_by(Delivery.subscription_id).subquery("dead")
        )
        rows = session.execute(
            select(
                Subscription.id, Subscription.description,
                func.coalesce(latency.c.delivered, 0).label("delivered"),
                func.coalesce(failed.c.failed, 0).label("failed"),
                func.coalesce(dead.c.dead, 0).label("dead"),
                latency.c.p50_ms, latency.c.p99_ms,
            )
            .outerjoin(latency, latency.c.subscription_id == Subscription.id)
            .outerjoin(failed, failed.c.subscription_id == Subscription.id)
            .outerjoin(dead, dead.c.subscription_id == Subscription.id)
            .where(Subscription.deleted_at.is_(None))
            .order_by(Subscription.created_at, Subscription.id)
        ).all()
    return WeeklyReport(period_start=start, period_end=end, rows=tuple(
        ReportRow(subscription_id=row.id, description=row.description or "", delivered=row.delivered,
                  failed=row.failed, dead=row.dead,
                  p50_ms=None if row.p50_ms is None else float(row.p50_ms),
                  p99_ms=None if row.p99_ms is None else float(row.p99_ms))
        for row in rows
    ))
