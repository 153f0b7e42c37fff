"""The store's tables (SQLAlchemy 2 declarative); the Alembic migrations create exactly these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiKey", "Attempt", "Base", "BeatRun", "Delivery", "EndpointHealth", "Event", "Job", "Subscription",
    "UTCDateTime",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every engine: SQLite hands them back naive, PostgreSQL in the session's zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # SHA-256 of the whole key: keys are 256-bit random, so a fast hash is enough and lookups stay O(1).
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class Subscription(Base):
    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    event_types: Mapped[list[str]] = mapped_column(JSON)
    url: Mapped[str | None] = mapped_column(String(2048))
    secret: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(default=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Delays in seconds before each attempt; None means the global HOOKGATE_RETRY_SCHEDULE.
    retry_schedule: Mapped[list[float] | None] = mapped_column(JSON)
    payload_format: Mapped[str] = mapped_column(String(32), default="standard-webhooks",
                                                server_default="standard-webhooks")
    rate_limit_per_s: Mapped[float | None]
    max_in_flight: Mapped[int | None]
    # The secret before the last rotation, still signing beside the new one until it expires.
    previous_secret: Mapped[str | None] = mapped_column(String(200))
    previous_secret_expires_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    owner_key_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    deleted_at: Mapped[datetime | None]


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("source", "id", name="uq_events_source_id"),)

    # The surrogate key; the CloudEvents identity is (source, id).
    pk: Mapped[str] = mapped_column(String(36), primary_key=True)
    id: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(1024))
    type: Mapped[str] = mapped_column(String(255), index=True)
    subject: Mapped[str | None] = mapped_column(String(1024))
    time: Mapped[datetime | None]
    # The whole structured CloudEvent as JSON text, exactly as it was routed.
    body: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(index=True)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("event_pk", "subscription_id", name="uq_deliveries_event_subscription"),
        Index("ix_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_deliveries_subscription", "subscription_id", "id"),
        # In-flight counts per endpoint: only leased rows have a lease_until ahead of now.
        Index("ix_deliveries_subscription_lease", "subscription_id", "lease_until"),
        Index("ix_deliveries_subscription_held", "subscription_id", "held_since"),
        # The stuck-delivery sweep: open deliveries nobody touched for a while.
        Index("ix_deliveries_status_updated", "status", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    event_pk: Mapped[str] = mapped_column(ForeignKey("events.pk", ondelete="CASCADE"))
    subscription_id: Mapped[str] = mapped_column(ForeignKey("subscriptions.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    attempts_count: Mapped[int] = mapped_column(Integer, default=0)
    # attempts_count when the retry schedule last started over (a manual retry or recover).
    attempts_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A worker holds a delivery while it sends; another worker may take it only once this has passed.
    lease_until: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    # Set while the delivery waits on its endpoint (breaker open, or its in-flight limit reached) with no
    # message in the broker; the endpoint's release re-enqueues it.
    held_since: Mapped[datetime | None]
    # A send slot reserved under the subscription's rate limit: the delivery comes back then and uses it.
    rate_slot_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class EndpointHealth(Base):
    """One row per subscription that has been sent to: its circuit breaker and rate-limit clock."""

    __tablename__ = "endpoint_health"

    subscription_id: Mapped[str] = mapped_column(ForeignKey("subscriptions.id", ondelete="CASCADE"),
                                                 primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="closed")
    window_started_at: Mapped[datetime]
    window_attempts: Mapped[int] = mapped_column(Integer, default=0)
    window_failures: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime | None]
    # While open: when the next probe may go, and the one delivery that is the probe (scheduled or in
    # flight) until probe_until; a probe that never reports back frees the role then.
    next_probe_at: Mapped[datetime | None]
    probe_delivery_id: Mapped[str | None] = mapped_column(String(36))
    probe_until: Mapped[datetime | None]
    probe_interval_s: Mapped[float] = mapped_column(default=0.0)
    failing_since: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]
    # The rate limiter's theoretical arrival time (GCRA): the next free send slot.
    rate_tat: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    duration_ms: Mapped[float]
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    response_headers: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    response_body: Mapped[str | None] = mapped_column(Text)


class BeatRun(Base):
    """When each beat entry was last sent: the lock's next holder carries on from here, not from its own start."""

    __tablename__ = "beat_runs"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_run_at: Mapped[datetime]


class Job(Base):
    """A heavy job (an import or a report): its request, its checkpoint, and which task runs it now."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    # The first task; the one the job belongs to now (a continuation after a soft time limit), and the
    # task that handed it over, which sends the continuation again should it die before doing so.
    task_id: Mapped[str] = mapped_column(String(36))
    current_task_id: Mapped[str] = mapped_column(String(36))
    handed_over_by: Mapped[str | None] = mapped_column(String(36))
    # Set while current_task_id runs: a second start of the same task means the first one was lost.
    running: Mapped[bool] = mapped_column(default=False)
    source_url: Mapped[str | None] = mapped_column(String(2048))
    # Report filters, and the CloudEvents source of imported events that name none.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    downloaded: Mapped[bool] = mapped_column(default=False)
    # The checkpoint: input bytes and lines done, error report bytes written, events published.
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    lines_done: Mapped[int] = mapped_column(BigInteger, default=0)
    error_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    published: Mapped[int] = mapped_column(BigInteger, default=0)
    errors_count: Mapped[int] = mapped_column(BigInteger, default=0)
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
    continuations: Mapped[int] = mapped_column(Integer, default=0)
    lost_runs: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    owner_key_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
