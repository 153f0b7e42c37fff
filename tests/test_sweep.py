"""The stuck-delivery sweep: what it takes from the store, and a stranded delivery sent by it exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.models import Delivery, Subscription
from consumers.store.sweep import take_stuck
from consumers.topology import declare_topology
from schemas.deliveries import DeliveryStatus
from schemas.settings import Settings
from tests.beats import running_beat
from tests.history import add_event, add_past_delivery
from tests.receiver import Receiver, make_secret
from tests.seeding import add_subscription
from tests.workers import Worker, wait_until


@pytest.fixture
def sessions(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(store_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_the_sweep_takes_only_stranded_deliveries(sessions: sessionmaker[Session]) -> None:
    """Open, untouched and due past the threshold, not leased, not held, of a live subscription: only those
    are taken, and a taken one is left alone by the next sweep until the threshold has passed again."""
    now = utcnow()
    old, recent = now - timedelta(minutes=10), now - timedelta(seconds=30)
    live = add_subscription(sessions, "https://example.com/hook", make_secret())
    deleted = add_subscription(sessions, "https://example.com/gone", make_secret(), deleted_at=now)
    event = add_event(sessions, old)

    def delivery(status: DeliveryStatus, subscription_id: str = live, **columns: object) -> str:
        return add_past_delivery(sessions, add_event(sessions, old), subscription_id, status, old, **columns)

    stranded = delivery(DeliveryStatus.PENDING)
    overdue_retry = delivery(DeliveryStatus.RETRYING, next_attempt_at=old)
    killed_mid_send = delivery(DeliveryStatus.SENDING, lease_until=old)  # its task killed at the hard limit
    expected = {stranded, overdue_retry, killed_mid_send}
    delivery(DeliveryStatus.PENDING, lease_until=now + timedelta(minutes=1))  # in flight
    delivery(DeliveryStatus.SENDING, lease_until=now + timedelta(minutes=1))  # an email being sent
    delivery(DeliveryStatus.PENDING, held_since=old)  # held by its endpoint; the release sends it
    delivery(DeliveryStatus.RETRYING, next_attempt_at=now + timedelta(minutes=5))  # waiting in the broker
    delivery(DeliveryStatus.RETRYING, next_attempt_at=recent)  # due, but only just
    delivery(DeliveryStatus.SUCCEEDED)
    delivery(DeliveryStatus.DEAD)
    delivery(DeliveryStatus.PENDING, subscription_id=deleted)
    add_past_delivery(sessions, event, live, DeliveryStatus.PENDING, recent)  # touched lately

    assert take_stuck(sessions, 300, 100) == sorted(expected)
    assert take_stuck(sessions, 300, 100) == []
    # Taken ones were marked as looked at now: a sweep with a shorter threshold finds them again.
    assert set(take_stuck(sessions, 0.001, 100)) >= expected


def test_the_sweep_takes_at_most_its_batch(sessions: sessionmaker[Session]) -> None:
    """One sweep takes ``limit`` deliveries, oldest first; the next takes the rest."""
    old = utcnow() - timedelta(hours=1)
    subscription_id = add_subscription(sessions, "https://example.com/hook", make_secret())
    ids = [add_past_delivery(sessions, add_event(sessions, old), subscription_id, DeliveryStatus.PENDING,
                             old + timedelta(seconds=n)) for n in range(5)]
    assert take_stuck(sessions, 60, 3) == sorted(ids[:3])
    assert take_stuck(sessions, 60, 3) == sorted(ids[3:])


@pytest.fixture
def beat_settings(make_settings: Callable[..., Settings], module_store_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url=module_store_url, sweep_schedule="1", sweep_stuck_after_s=1.0,
                         cleanup_schedule="", report_schedule="", beat_lock_poll_s=0.5, state_dir=tmp_path,
                         task_soft_time_limit_s=5, task_time_limit_s=10)


def test_a_stranded_delivery_is_sent_by_the_sweep_exactly_once(beat_settings: Settings, tmp_path: Path) -> None:
    """A delivery left pending without a task (a crash between commit and publish) is sent by the sweep
    through a real beat and worker exactly once; a delivery leased by a send in flight is not sent."""
    with Connection(beat_settings.broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge("webhooks")
    engine = make_engine(beat_settings.database_url)
    sessions = make_sessionmaker(engine)
    secret = make_secret()
    old = utcnow() - timedelta(minutes=5)
    try:
        with Receiver(secret) as receiver:
            subscription_id = add_subscription(sessions, receiver.url, secret)
            stranded = add_past_delivery(sessions, add_event(sessions, old), subscription_id,
                                         DeliveryStatus.PENDING, old)
            in_flight = add_past_delivery(sessions, add_event(sessions, old), subscription_id, DeliveryStatus.PENDING,
                                          old, lease_until=utcnow() + timedelta(minutes=10))
            with Worker(beat_settings, tmp_path / "worker.log"), running_beat(beat_settings, tmp_path / "beat.log"):
                receiver.wait_for(1, timeout_s=20)
                wait_until(lambda: _status(sessions, stranded) == DeliveryStatus.SUCCEEDED, "the delivery recorded")
                # Several more sweeps run meanwhile: nothing more may arrive.
                time.sleep(4)
            assert [r.webhook_id for r in receiver.ledger] == [stranded], receiver.ledger
            assert receiver.ledger[0].verified
            assert _status(sessions, in_flight) == DeliveryStatus.PENDING
    finally:
        with sessions.begin() as session:
            session.execute(update(Subscription).values(deleted_at=utcnow()))
        engine.dispose()


def _status(sessions: sessionmaker[Session], delivery_id: str) -> str:
    with sessions() as session:
        return session.execute(select(Delivery.status).where(Delivery.id == delivery_id)).scalar_one()
