"""A delivery's life in the store: claimed under a lease, then one attempt recorded per send."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, bindparam, exists, insert, or_, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store import endpoints
from consumers.store.database import utcnow
from consumers.store.endpoints import Claimed, EndpointPolicy, Settlement, Transition, TransitionKind
from consumers.store.errors import translate_errors
from consumers.store.models import Attempt, Delivery, Event, Subscription
from schemas.deliveries import OPEN_STATUSES, DeliveryStatus
from schemas.subscriptions import Channel

__all__ = [
    "AttemptRecord",
    "ChannelJob",
    "Claim",
    "DeliveryJob",
    "Outcome",
    "Recorded",
    "SkipReason",
    "cancel",
    "claim",
    "claim_channel",
    "claim_many",
    "hold_disabled",
    "record_attempt",
    "record_attempts",
    "release_held",
    "skip_reason",
]

_deliveries = Delivery.__table__
_events = Event.__table__
_subscriptions = Subscription.__table__
_attempts = Attempt.__table__
_webhook_subscription = and_(
    _subscriptions.c.channel == Channel.WEBHOOK.value, _subscriptions.c.url.is_not(None),
    _subscriptions.c.secret.is_not(None),
)
_OPEN = [status.value for status in OPEN_STATUSES]
# A retry published with a countdown arrives after the next_attempt_at we stored; the slack only
# absorbs clock differences between worker hosts.
_DUE_SLACK = timedelta(seconds=0.5)


class SkipReason(StrEnum):
    """Why a delivery was not claimed."""

    UNKNOWN = "unknown delivery"
    FINISHED = "already finished"
    SUBSCRIPTION_DELETED = "subscription deleted"
    SUBSCRIPTION_DISABLED = "subscription disabled"
    NOT_A_WEBHOOK = "not a webhook subscription with a URL and a secret"
    OTHER_CHANNEL = "not a subscription of this channel"
    LEASED = "leased by another worker"
    NOT_DUE = "not due yet"
    RELEASED = "claimable again (released meanwhile)"


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """Everything one attempt needs, read in the claim's transaction."""

    delivery_id: str
    attempt: int
    event_id: str
    event_type: str
    event_received_at: datetime
    # The structured CloudEvent as JSON text, exactly as the router stored it.
    event_body: str
    subscription_id: str
    url: str
    secret: str
    # The secret before a rotation while its grace period lasts: requests are signed with both.
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    payload_format: str
    # The subscription's own retry delays, if it has them, and the attempt number at which the
    # schedule last started over (a manual retry or recover resets it).
    retry_schedule: tuple[float, ...] | None
    schedule_attempt: int
    # Not before: the rate limit's slot for it, less than a second away.
    send_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ChannelJob:
    """One attempt at an email or task delivery, read in the claim's transaction."""

    delivery_id: str
    attempt: int
    event_id: str
    event_type: str
    event_received_at: datetime
    event_body: str
    subscription_id: str
    # The subscription's channel fields (schemas.email.EmailOptions, schemas.tasks.TaskOptions).
    options: dict[str, Any]
    retry_schedule: tuple[float, ...] | None
    schedule_attempt: int


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """What happened on one send; ``status_code`` is None when no response came back."""

    started_at: datetime
    duration_ms: float
    status_code: int | None = None
    error: str | None = None
    response_headers: dict[str, Any] | None = None
    response_body: str | None = None


def _scalar(column: Any, key: Any, where: Any, name: str | None = None) -> Any:
    return select(column).where(key == where).scalar_subquery().label(name or column.name)


# Built once and run on the session's Connection: SQLAlchemy then reuses the compiled form and skips the
# ORM's execution layer, which matters at a thousand deliveries a second.
# The subqueries in RETURNING read what the attempt needs in the same statement (SQLite's RETURNING may
# not name joined tables, but it may hold subqueries).
_CLAIM = (
    update(_deliveries)
    .where(
        _deliveries.c.id.in_(bindparam("p_ids", expanding=True)),
        _deliveries.c.status.in_(_OPEN),
        or_(_deliveries.c.lease_until.is_(None), _deliveries.c.lease_until < bindparam("p_now")),
        or_(_deliveries.c.next_attempt_at.is_(None), _deliveries.c.next_attempt_at <= bindparam("p_due_by")),
        exists().where(
            _subscriptions.c.id == _deliveries.c.subscription_id,
            _subscriptions.c.enabled.is_(True),
            _subscriptions.c.deleted_at.is_(None),
            _webhook_subscription,
        ),
    )
    .values(lease_until=bindparam("p_lease_until"), attempts_count=_deliveries.c.attempts_count + 1,
            updated_at=bindparam("p_now"))
    .returning(
        _deliveries.c.id,
        _deliveries.c.attempts_count,
        _deliveries.c.attempts_base,
        _deliveries.c.rate_slot_at,
        _deliveries.c.subscription_id,
        _scalar(_events.c.id, _events.c.pk, _deliveries.c.event_pk, "event_id"),
        *(_scalar(c, _events.c.pk, _deliveries.c.event_pk)
          for c in (_events.c.type, _events.c.received_at, _events.c.body)),
        *(_scalar(c, _subscriptions.c.id, _deliveries.c.subscription_id)
          for c in (_subscriptions.c.url, _subscriptions.c.secret, _subscriptions.c.previous_secret,
                    _subscriptions.c.previous_secret_expires_at, _subscriptions.c.payload_format,
                    _subscriptions.c.retry_schedule, _subscriptions.c.max_in_flight,
                    _subscriptions.c.rate_limit_per_s)),
    )
)


@dataclass(frozen=True, slots=True)
class Claim:
    """The deliveries to send now, and those the endpoint's limits held or deferred (id, until when)."""

    jobs: list[DeliveryJob]
    held: list[str]
    deferred: list[tuple[str, datetime]]


def claim_many(sessions: sessionmaker[Session], delivery_ids: Sequence[str], lease_s: float,
               policy: EndpointPolicy | None = None) -> Claim:
    """Take each of these deliveries that is ours to send now for one attempt, in one transaction.

    A delivery is left out when it is finished (succeeded, dead, cancelled), unknown, leased by
    another worker, not due yet (``next_attempt_at`` ahead), or its subscription is disabled or
    deleted. The conditional UPDATE is the lock: of two workers holding the same delivery id,
    exactly one gets its row back. A manual retry or replay makes a delivery claimable again by
    setting it ``pending`` with ``next_attempt_at`` NULL and no live lease. With a ``policy``, the
    endpoint's breaker and limits then decide which of the claimed ones go now (``endpoints.admit``).
    """
    with translate_errors("claiming deliveries"), sessions.begin() as session:
        connection = session.connection()
        # After BEGIN: on SQLite that may have waited for the write lock, and slots count from now.
        now = utcnow()
        params = {"p_ids": list(delivery_ids), "p_now": now, "p_due_by": now + _DUE_SLACK,
                  "p_lease_until": now + timedelta(seconds=lease_s)}
        rows = connection.execute(_CLAIM, params).all()
        admission = endpoints.admit(
            connection,
            [Claimed(row.id, row.subscription_id, row.max_in_flight, row.rate_limit_per_s, row.rate_slot_at)
             for row in rows],
            policy, now,
        ) if policy is not None and rows else None
    jobs = [
        DeliveryJob(
            delivery_id=row.id, attempt=row.attempts_count, event_id=row.event_id, event_type=row.type,
            event_received_at=row.received_at, event_body=row.body, subscription_id=row.subscription_id,
            url=row.url, secret=row.secret, previous_secret=row.previous_secret,
            previous_secret_expires_at=row.previous_secret_expires_at, payload_format=row.payload_format,
            retry_schedule=tuple(row.retry_schedule) if row.retry_schedule else None,
            schedule_attempt=row.attempts_count - row.attempts_base,
            send_at=admission.send_at.get(row.id) if admission is not None else None,
        )
        for row in rows
        if admission is None or row.id in admission.admitted
    ]
    if admission is None:
        return Claim(jobs, [], [])
    return Claim(jobs, admission.held, admission.deferred)


def claim(sessions: sessionmaker[Session], delivery_id: str, lease_s: float) -> DeliveryJob | None:
    """``claim_many`` for one delivery, without endpoint limits: the job, or None if not ours now."""
    jobs = claim_many(sessions, [delivery_id], lease_s).jobs
    return jobs[0] if jobs else None


# Email and task deliveries are sent one per task, in the task's own thread: the claim also moves the
# delivery to `sending`, so that the API shows which ones may be on the wire right now.
_CLAIM_CHANNEL = (
    update(_deliveries)
    .where(
        _deliveries.c.id == bindparam("p_id"),
        _deliveries.c.status.in_(_OPEN),
        or_(_deliveries.c.lease_until.is_(None), _deliveries.c.lease_until < bindparam("p_now")),
        or_(_deliveries.c.next_attempt_at.is_(None), _deliveries.c.next_attempt_at <= bindparam("p_due_by")),
        exists().where(
            _subscriptions.c.id == _deliveries.c.subscription_id,
            _subscriptions.c.enabled.is_(True),
            _subscriptions.c.deleted_at.is_(None),
            _subscriptions.c.channel == bindparam("p_channel"),
        ),
    )
    .values(status=DeliveryStatus.SENDING.value, lease_until=bindparam("p_lease_until"),
            attempts_count=_deliveries.c.attempts_count + 1, updated_at=bindparam("p_now"))
    .returning(
        _deliveries.c.id,
        _deliveries.c.attempts_count,
        _deliveries.c.attempts_base,
        _deliveries.c.subscription_id,
        _scalar(_events.c.id, _events.c.pk, _deliveries.c.event_pk, "event_id"),
        *(_scalar(c, _events.c.pk, _deliveries.c.event_pk)
          for c in (_events.c.type, _events.c.received_at, _events.c.body)),
        *(_scalar(c, _subscriptions.c.id, _deliveries.c.subscription_id)
          for c in (_subscriptions.c.options, _subscriptions.c.retry_schedule)),
    )
)


def claim_channel(sessions: sessionmaker[Session], delivery_id: str, channel: Channel,
                  lease_s: float) -> ChannelJob | None:
    """Take an email or task delivery for one attempt: the job, or None if it is not ours to send now.

    As ``claim_many``, the conditional UPDATE is the lock (of two workers holding the same delivery,
    exactly one gets the row back); it also sets the delivery ``sending`` under a lease of ``lease_s``.
    """
    with translate_errors("claiming a delivery"), sessions.begin() as session:
        now = utcnow()
        row = session.connection().execute(_CLAIM_CHANNEL, {
            "p_id": delivery_id, "p_now": now, "p_due_by": now + _DUE_SLACK, "p_channel": channel.value,
            "p_lease_until": now + timedelta(seconds=lease_s),
        }).first()
    if row is None:
        return None
    return ChannelJob(
        delivery_id=row.id, attempt=row.attempts_count, event_id=row.event_id, event_type=row.type,
        event_received_at=row.received_at, event_body=row.body, subscription_id=row.subscription_id,
        options=dict(row.options or {}), retry_schedule=tuple(row.retry_schedule) if row.retry_schedule else None,
        schedule_attempt=row.attempts_count - row.attempts_base,
    )


def skip_reason(sessions: sessionmaker[Session], delivery_id: str,
                channel: Channel = Channel.WEBHOOK) -> SkipReason:
    """Why a claim of this channel returned nothing (read after the fact, so a hint for the log and for cleanup)."""
    of_channel = (_webhook_subscription if channel is Channel.WEBHOOK
                  else _subscriptions.c.channel == channel.value)
    query = (
        select(_deliveries.c.status, _deliveries.c.lease_until, _deliveries.c.next_attempt_at,
               _subscriptions.c.enabled, _subscriptions.c.deleted_at, of_channel.label("of_channel"))
        .join(_subscriptions, _subscriptions.c.id == _deliveries.c.subscription_id)
        .where(_deliveries.c.id == delivery_id)
    )
    with translate_errors("reading a delivery"), sessions() as session:
        # A read: on SQLite it must not queue for the write lock behind busy workers.
        row = session.connection(execution_options={"readonly": True}).execute(query).first()
    now = utcnow()
    if row is None:
        return SkipReason.UNKNOWN
    if row.status not in _OPEN:
        return SkipReason.FINISHED
    if row.deleted_at is not None:
        return SkipReason.SUBSCRIPTION_DELETED
    if not row.enabled:
        return SkipReason.SUBSCRIPTION_DISABLED
    if not row.of_channel:
        return SkipReason.NOT_A_WEBHOOK if channel is Channel.WEBHOOK else SkipReason.OTHER_CHANNEL
    if row.lease_until is not None and row.lease_until >= now:
        return SkipReason.LEASED
    if row.next_attempt_at is not None and row.next_attempt_at > now + _DUE_SLACK:
        return SkipReason.NOT_DUE
    return SkipReason.RELEASED


_INSERT_ATTEMPT = insert(_attempts)
_DISABLE = (
    update(_subscriptions)
    .where(_subscriptions.c.id == bindparam("p_id"), _subscriptions.c.enabled.is_(True))
    .values(enabled=False, disabled_reason=bindparam("p_reason"), updated_at=bindparam("p_now"))
)
# Settles every delivery of a batch that ends the same way (all successes, typically) in one statement:
# each (id, attempt) pair matches only while that attempt is still the delivery's, and RETURNING names
# the ones it settled.
_SETTLE = (
    update(_deliveries)
    .where(tuple_(_deliveries.c.id, _deliveries.c.attempts_count).in_(bindparam("p_attempts", expanding=True)),
           _deliveries.c.status.in_(_OPEN))
    .values(status=bindparam("p_status"), lease_until=None, next_attempt_at=bindparam("p_next_attempt_at"),
            last_error=bindparam("p_error"), rate_slot_at=None, updated_at=bindparam("p_now"))
    .returning(_deliveries.c.id, _deliveries.c.attempts_count)
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result and where it leaves the delivery."""

    job: DeliveryJob | ChannelJob
    record: AttemptRecord
    status: DeliveryStatus
    next_attempt_at: datetime | None = None
    # The endpoint answered 410 Gone: its subscription is disabled in the same transaction, and the
    # change is among the settlement's transitions, to be announced like a breaker's.
    disable_subscription: bool = False


@dataclass(frozen=True, slots=True)
class Recorded:
    """Per outcome, whether it still settled its delivery; and what settling set off at the endpoints."""

    current: list[bool]
    settlement: Settlement


def record_attempts(sessions: sessionmaker[Session], outcomes: Sequence[Outcome],
                    policy: EndpointPolicy | None = None) -> Recorded:
    """Insert the attempts and move each delivery to its status, releasing leases, in one transaction.

    An outcome is not current when its delivery was no longer this attempt's (cancelled meanwhile,
    or the lease expired and another worker claimed it): the attempt is still recorded, the status
    left alone. With a ``policy``, the current outcomes then count towards their endpoint's health
    (``endpoints.settle``). A subscription a 410 disabled is among the settlement's transitions.
    """
    now = utcnow()
    attempts = [
        {
            "delivery_id": o.job.delivery_id, "number": o.job.attempt, "started_at": o.record.started_at,
            "duration_ms": o.record.duration_ms, "status_code": o.record.status_code, "error": o.record.error,
            "response_headers": o.record.response_headers, "response_body": o.record.response_body,
        }
        for o in outcomes
    ]
    with translate_errors("recording delivery attempts"), sessions.begin() as session:
        connection = session.connection()
        connection.execute(_INSERT_ATTEMPT, attempts)
        gone: list[Transition] = []
        for o in outcomes:
            if not o.disable_subscription:
                continue
            reason = f"the endpoint answered {o.record.error or 'HTTP 410'}"
            # Only the 410 that disabled it is a change to announce: two in one batch are one change.
            if connection.execute(_DISABLE, {"p_id": o.job.subscription_id, "p_now": now,
                                             "p_reason": reason}).rowcount == 1:
                gone.append(Transition(o.job.subscription_id, TransitionKind.DISABLED, reason))
        settled: set[tuple[str, int]] = set()
        for (status, next_attempt_at, error), attempts_of in _by_ending(outcomes).items():
            rows = connection.execute(_SETTLE, {
                "p_attempts": attempts_of, "p_status": status.value, "p_next_attempt_at": next_attempt_at,
                "p_error": error, "p_now": now,
            })
            settled.update((row.id, row.attempts_count) for row in rows)
        current = [(o.job.delivery_id, o.job.attempt) in settled for o in outcomes]
        settlement = endpoints.settle(connection, [
            endpoints.Result(o.job.delivery_id, o.job.subscription_id, o.status is DeliveryStatus.SUCCEEDED)
            for o, kept in zip(outcomes, current, strict=True) if kept
        ], policy, now) if policy is not None else Settlement()
    settlement.transitions[:0] = gone
    return Recorded(current, settlement)


def _by_ending(outcomes: Sequence[Outcome]) -> dict[tuple[DeliveryStatus, datetime | None, str | None],
                                                   list[tuple[str, int]]]:
    """The outcomes' (delivery id, attempt) pairs by the status, next attempt time and error they leave."""
    groups: dict[tuple[DeliveryStatus, datetime | None, str | None], list[tuple[str, int]]] = {}
    for o in outcomes:
        error = None if o.status is DeliveryStatus.SUCCEEDED else o.record.error
        groups.setdefault((o.status, o.next_attempt_at, error), []).append((o.job.delivery_id, o.job.attempt))
    return groups


def hold_disabled(sessions: sessionmaker[Session], delivery_ids: Sequence[str]) -> None:
    """Park deliveries of a disabled subscription until it is enabled again (``release_held``)."""
    with translate_errors("holding deliveries"), sessions.begin() as session:
        endpoints.hold(session.connection(), delivery_ids, utcnow())


def release_held(sessions: sessionmaker[Session], subscription_id: str, limit: int) -> list[str]:
    """Release up to ``limit`` held deliveries of a subscription; their ids, for the caller to enqueue."""
    with translate_errors("releasing held deliveries"), sessions.begin() as session:
        return endpoints.take_held(session.connection(), subscription_id, limit, utcnow())


def record_attempt(sessions: sessionmaker[Session], job: DeliveryJob | ChannelJob, record: AttemptRecord,
                   status: DeliveryStatus, *, next_attempt_at: datetime | None = None) -> bool:
    """``record_attempts`` for one attempt."""
    return record_attempts(sessions, [Outcome(job, record, status, next_attempt_at)]).current[0]


def cancel(sessions: sessionmaker[Session], delivery_id: str, reason: str) -> bool:
    """Cancel an open delivery that nobody holds; False if it was finished or leased."""
    now = utcnow()
    stop = (
        update(_deliveries)
        .where(_deliveries.c.id == delivery_id, _deliveries.c.status.in_(_OPEN),
               or_(_deliveries.c.lease_until.is_(None), _deliveries.c.lease_until < now))
        .values(status=DeliveryStatus.CANCELLED.value, last_error=reason, next_attempt_at=None, updated_at=now)
    )
    with translate_errors("cancelling a delivery"), sessions.begin() as session:
        return session.connection().execute(stop).rowcount == 1

