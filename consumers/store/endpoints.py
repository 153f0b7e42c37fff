"""Endpoint health and limits, kept in the store so that every worker process obeys the same ones.

Per subscription, inside the transactions that claim and settle its deliveries:

- a **circuit breaker**: when most attempts of the current window fail, the subscription is
  *paused*: its deliveries are held (not failed) and one delivery at a time goes out as a probe,
  at growing intervals, until one succeeds (*resumed*). An endpoint failing without a success for
  ``disable_after_s`` is *disabled*;
- a **concurrency limit**: at most ``max_in_flight`` deliveries leased (being sent) at once;
- a **rate limit**: sends evenly spaced at ``rate_limit_per_s``, each delivery over the limit
  deferred to a send slot reserved for it.

A held delivery has ``held_since`` set and no message in the broker; settling releases held
deliveries as slots free up, so no delivery is polled while it waits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from consumers.store.models import Delivery, EndpointHealth, Subscription
from schemas.deliveries import OPEN_STATUSES
from schemas.settings import Settings

__all__ = [
    "Admission",
    "Claimed",
    "EndpointPolicy",
    "Result",
    "Settlement",
    "Transition",
    "TransitionKind",
    "admit",
    "hold",
    "settle",
    "take_held",
]

_deliveries = Delivery.__table__
_health = EndpointHealth.__table__
_subscriptions = Subscription.__table__
_CLOSED, _OPEN = "closed", "open"
_OPEN_STATUSES = [status.value for status in OPEN_STATUSES]


class TransitionKind(StrEnum):
    """Changes of an endpoint's state, each published as a ``hookgate.subscription.*`` event."""

    PAUSED = "paused"
    RESUMED = "resumed"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class Transition:
    subscription_id: str
    kind: TransitionKind
    reason: str


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    window_s: float
    min_attempts: int
    failure_ratio: float
    probe_interval_s: float
    probe_interval_max_s: float
    disable_after_s: float
    max_in_flight: int
    lease_s: float

    @classmethod
    def from_settings(cls, settings: Settings, lease_s: float) -> EndpointPolicy:
        return cls(settings.breaker_window_s, settings.breaker_min_attempts, settings.breaker_failure_ratio,
                   settings.breaker_probe_interval_s, settings.breaker_probe_interval_max_s,
                   settings.endpoint_disable_after_s, settings.endpoint_max_in_flight, lease_s)


@dataclass(slots=True)
class Admission:
    """What the claim may send now; the rest is held, or deferred (id, when) to a rate slot or probe time."""

    admitted: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)
    deferred: list[tuple[str, datetime]] = field(default_factory=list)
    # The rate-limit slot reserved for each deferred delivery that waits on one.
    rate_slots: dict[str, datetime] = field(default_factory=dict)
    # Admitted deliveries whose rate slot is less than a second away: the sender waits for it.
    # (The broker's delayed delivery counts whole seconds.)
    send_at: dict[str, datetime] = field(default_factory=dict)


@dataclass(slots=True)
class Settlement:
    """What settling a batch set off: deliveries to enqueue now or after a delay, and state changes."""

    release: list[str] = field(default_factory=list)
    delayed: list[tuple[str, datetime]] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Claimed:
    """One claimed delivery as the admission sees it."""

    delivery_id: str
    subscription_id: str
    max_in_flight: int | None
    rate_limit_per_s: float | None
    rate_slot_at: datetime | None


def _lock_health(conn: Connection, subscription_ids: Iterable[str], now: datetime) -> dict[str, dict[str, Any]]:
    """The health rows of these subscriptions, created if missing, locked until the transaction ends.

    Sorted, so that two transactions lock in the same order (PostgreSQL); SQLite's BEGIN IMMEDIATE
    has already serialised writers.
    """
    ids = sorted(set(subscription_ids))
    if not ids:
        return {}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(
        dialect.insert(_health).on_conflict_do_nothing(index_elements=["subscription_id"]),
        [{"subscription_id": i, "state": _CLOSED, "window_started_at": now, "window_attempts": 0,
          "window_failures": 0, "probe_interval_s": 0.0, "updated_at": now} for i in ids],
    )
    query = select(_health).where(_health.c.subscription_id.in_(ids)).order_by(_health.c.subscription_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return {row.subscription_id: dict(row._mapping) for row in conn.execute(query)}


def _in_flight(conn: Connection, subscription_ids: Iterable[str], now: datetime) -> dict[str, int]:
    query = (
        select(_deliveries.c.subscription_id, func.count())
        .where(_deliveries.c.subscription_id.in_(sorted(set(subscription_ids))), _deliveries.c.lease_until > now)
        .group_by(_deliveries.c.subscription_id)
    )
    return dict(conn.execute(query).all())  # type: ignore[arg-type]


def _save_health(conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    if rows:
        columns = [c.name for c in _health.columns if c.name != "subscription_id"]
        statement = (
            update(_health).where(_health.c.subscription_id == bindparam("b_id"))
            .values({name: bindparam(f"b_{name}") for name in columns})
        )
        conn.execute(statement, [{"b_id": r["subscription_id"], **{f"b_{n}": r[n] for n in columns}} for r in rows])


def _probe_free(health: dict[str, Any], now: datetime) -> bool:
    return health["probe_delivery_id"] is None or health["probe_until"] is None or health["probe_until"] < now


def admit(conn: Connection, claimed: Sequence[Claimed], policy: EndpointPolicy, now: datetime) -> Admission:
    """Decide, for deliveries just claimed (leased), which go out now; in the claim's transaction."""
    admission = Admission()
    if not claimed:
        return admission
    by_subscription: defaultdict[str, list[Claimed]] = defaultdict(list)
    for item in claimed:
        by_subscription[item.subscription_id].append(item)
    health = _lock_health(conn, by_subscription, now)
    in_flight = _in_flight(conn, by_subscription, now)
    for subscription_id, items in by_subscription.items():
        h = health[subscription_id]
        if h["state"] == _OPEN:
            go = _admit_while_open(h, items, policy, now, admission)
        else:
            limit = items[0].max_in_flight or policy.max_in_flight
            # in_flight counts this claim's own leases too.
            free = max(0, limit - (in_flight.get(subscription_id, 0) - len(items)))
            go, rest = items[:free], items[free:]
            admission.held += [i.delivery_id for i in rest]
        rate = items[0].rate_limit_per_s
        if rate:
            go = _rate_limit(h, go, rate, now, admission)
        admission.admitted.update(i.delivery_id for i in go)
        h["updated_at"] = now
    _save_health(conn, health.values())
    _put_back(conn, admission, now)
    return admission


def _admit_while_open(h: dict[str, Any], items: list[Claimed], policy: EndpointPolicy, now: datetime,
                      admission: Admission) -> list[Claimed]:
    """One probe at a time: the probe already chosen, or the first delivery when none is out.

    A probe that comes before its time is deferred to it; nothing else circulates for a paused
    endpoint, the rest is held until it resumes.
    """
    lease = timedelta(seconds=policy.lease_s)
    for item in items:
        if item.delivery_id == h["probe_delivery_id"] or _probe_free(h, now):
            h["probe_delivery_id"] = item.delivery_id
            if h["next_probe_at"] <= now:
                h["probe_until"] = now + lease
                admission.held += [i.delivery_id for i in items if i is not item]
                return [item]
            h["probe_until"] = h["next_probe_at"] + lease
            admission.deferred.append((item.delivery_id, h["next_probe_at"]))
            admission.held += [i.delivery_id for i in items if i is not item]
            return []
    admission.held += [i.delivery_id for i in items]
    return []


def _rate_limit(h: dict[str, Any], items: list[Claimed], rate: float, now: datetime,
                admission: Admission) -> list[Claimed]:
    """Evenly spaced sends (GCRA without burst): each send takes the next free slot, 1/rate apart."""
    interval = timedelta(seconds=1 / rate)
    go = []
    for item in items:
        slot = item.rate_slot_at
        if slot is None:  # a delivery deferred before comes back with its slot reserved
            slot = max(h["rate_tat"] or now, now)
            h["rate_tat"] = slot + interval
        if slot - now < timedelta(seconds=1):
            go.append(item)
            if slot > now:
                admission.send_at[item.delivery_id] = slot
        else:
            admission.deferred.append((item.delivery_id, slot))
            admission.rate_slots[item.delivery_id] = slot
    return go


def _put_back(conn: Connection, admission: Admission, now: datetime) -> None:
    """Undo the claim of what may not go now: the lease and the attempt number it took."""
    unclaim = {"lease_until": None, "attempts_count": _deliveries.c.attempts_count - 1, "updated_at": now}
    if admission.held:
        conn.execute(update(_deliveries).where(_deliveries.c.id.in_(admission.held))
                     .values(held_since=now, **unclaim))
    for delivery_id, due in admission.deferred:
        conn.execute(update(_deliveries).where(_deliveries.c.id == delivery_id)
                     .values(next_attempt_at=due, rate_slot_at=admission.rate_slots.get(delivery_id), **unclaim))


@dataclass(frozen=True, slots=True)
class Result:
    """One settled attempt as the endpoint's health sees it."""

    delivery_id: str
    subscription_id: str
    succeeded: bool


def settle(conn: Connection, results: Sequence[Result], policy: EndpointPolicy, now: datetime) -> Settlement:
    """Count attempts into each endpoint's window, move its breaker, and release held deliveries.

    Runs in the transaction that records the attempts, after their leases were released.
    """
    settlement = Settlement()
    if not results:
        return settlement
    by_subscription: defaultdict[str, list[Result]] = defaultdict(list)
    for result in results:
        by_subscription[result.subscription_id].append(result)
    health = _lock_health(conn, by_subscription, now)
    for subscription_id, items in by_subscription.items():
        _observe(health[subscription_id], items, policy, now, settlement)
        if _failing_too_long(health[subscription_id], policy, now) and _disable(conn, subscription_id, now):
            settlement.transitions.append(Transition(subscription_id, TransitionKind.DISABLED,
                                                     f"failing without a success for {policy.disable_after_s:.0f} s"))
        health[subscription_id]["updated_at"] = now
    _save_health(conn, health.values())
    _release(conn, health, policy, now, settlement)
    return settlement


def _observe(h: dict[str, Any], items: list[Result], policy: EndpointPolicy, now: datetime,
             settlement: Settlement) -> None:
    if (now - h["window_started_at"]).total_seconds() > policy.window_s:
        h["window_started_at"], h["window_attempts"], h["window_failures"] = now, 0, 0
    for item in items:
        h["window_attempts"] += 1
        if item.succeeded:
            h["last_success_at"], h["failing_since"] = now, None
        else:
            h["window_failures"] += 1
            h["failing_since"] = h["failing_since"] or now
        if item.delivery_id != h["probe_delivery_id"]:
            continue
        h["probe_delivery_id"] = h["probe_until"] = None
        if h["state"] != _OPEN:
            continue
        if item.succeeded:
            h.update(state=_CLOSED, opened_at=None, next_probe_at=None, probe_interval_s=0.0,
                     window_started_at=now, window_attempts=0, window_failures=0)
            settlement.transitions.append(Transition(item.subscription_id, TransitionKind.RESUMED,
                                                     "a probe delivery succeeded"))
        else:
            h["probe_interval_s"] = min(h["probe_interval_s"] * 2, policy.probe_interval_max_s)
            h["next_probe_at"] = now + timedelta(seconds=h["probe_interval_s"])
    attempts, failures = h["window_attempts"], h["window_failures"]
    if h["state"] == _CLOSED and attempts >= policy.min_attempts and failures / attempts > policy.failure_ratio:
        h.update(state=_OPEN, opened_at=now, probe_interval_s=policy.probe_interval_s,
                 next_probe_at=now + timedelta(seconds=policy.probe_interval_s), probe_delivery_id=None,
                 probe_until=None)
        settlement.transitions.append(Transition(
            items[0].subscription_id, TransitionKind.PAUSED, f"{failures} of the last {attempts} attempts failed"))


def _failing_too_long(h: dict[str, Any], policy: EndpointPolicy, now: datetime) -> bool:
    return h["failing_since"] is not None and (now - h["failing_since"]).total_seconds() >= policy.disable_after_s


def _disable(conn: Connection, subscription_id: str, now: datetime) -> bool:
    return conn.execute(
        update(_subscriptions)
        .where(_subscriptions.c.id == subscription_id, _subscriptions.c.enabled.is_(True))
        .values(enabled=False, disabled_reason="the endpoint kept failing", updated_at=now)
    ).rowcount == 1


def _release(conn: Connection, health: dict[str, dict[str, Any]], policy: EndpointPolicy, now: datetime,
             settlement: Settlement) -> None:
    """Held deliveries go out as slots free up; a paused endpoint with none out gets its next probe."""
    held = dict(conn.execute(
        select(_deliveries.c.subscription_id, func.count())
        .where(_deliveries.c.subscription_id.in_(sorted(health)), _deliveries.c.held_since.is_not(None))
        .group_by(_deliveries.c.subscription_id)
    ).all())
    if not held:
        return
    limits = dict(conn.execute(select(_subscriptions.c.id, _subscriptions.c.max_in_flight)
                               .where(_subscriptions.c.id.in_(sorted(held)), _subscriptions.c.enabled.is_(True))).all())
    in_flight = _in_flight(conn, limits, now)
    for subscription_id in limits:
        h = health[subscription_id]
        if h["state"] == _CLOSED:
            free = (limits[subscription_id] or policy.max_in_flight) - in_flight.get(subscription_id, 0)
            settlement.release += take_held(conn, subscription_id, free, now)
        elif _probe_free(h, now):
            taken = take_held(conn, subscription_id, 1, now, next_attempt_at=h["next_probe_at"])
            if taken:
                h["probe_delivery_id"] = taken[0]
                h["probe_until"] = h["next_probe_at"] + timedelta(seconds=policy.lease_s)
                settlement.delayed.append((taken[0], h["next_probe_at"]))
                _save_health(conn, [h])


def take_held(conn: Connection, subscription_id: str, limit: int, now: datetime,
              next_attempt_at: datetime | None = None) -> list[str]:
    """Release up to ``limit`` of the subscription's held deliveries, oldest first; their ids, to enqueue."""
    if limit <= 0:
        return []
    ids = list(conn.execute(
        select(_deliveries.c.id)
        .where(_deliveries.c.subscription_id == subscription_id, _deliveries.c.held_since.is_not(None))
        .order_by(_deliveries.c.held_since, _deliveries.c.id)
        .limit(limit)
    ).scalars())
    if ids:
        conn.execute(update(_deliveries).where(_deliveries.c.id.in_(ids), _deliveries.c.held_since.is_not(None))
                     .values(held_since=None, next_attempt_at=next_attempt_at, updated_at=now))
    return ids


def hold(conn: Connection, delivery_ids: Sequence[str], now: datetime) -> None:
    """Park open deliveries that nobody holds (their subscription is disabled) until a release."""
    conn.execute(update(_deliveries).where(
        _deliveries.c.id.in_(list(delivery_ids)), _deliveries.c.status.in_(_OPEN_STATUSES),
        _deliveries.c.held_since.is_(None), or_(_deliveries.c.lease_until.is_(None), _deliveries.c.lease_until < now),
    ).values(held_since=now, updated_at=now))
