"""Endpoint health and limits with real workers: the breaker pauses and resumes, limits hold across processes."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from celery import Celery
from kombu import Connection, Queue
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.announce import announce
from consumers.celery_app import make_celery
from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.endpoints import Transition, TransitionKind
from consumers.store.models import Delivery, EndpointHealth, Subscription
from consumers.topology import declare_topology, events_exchange
from schemas.ids import new_id
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import running_gateway
from tests.receiver import Received, Receiver, Reply, make_secret
from tests.seeding import add_delivery, add_subscription, statuses, wait_for
from tests.workers import Worker, free_port

# Four attempts decide the breaker; probes one then two seconds apart; retries far off, so that
# only probes and releases send again.
BREAKER = {
    "breaker_min_attempts": 4,
    "breaker_failure_ratio": 0.5,
    "breaker_probe_interval_s": 1.0,
    "breaker_probe_interval_max_s": 2.0,
    "retry_schedule": (0, 600),
    "task_soft_time_limit_s": 5,
    "task_time_limit_s": 10,
    "webhook_timeout_s": 5.0,
}


@pytest.fixture
def settings(make_settings: Callable[..., Settings], store_url: str) -> Settings:
    return make_settings(database_url=store_url, **BREAKER)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def sender(settings: Settings) -> Iterator[Celery]:
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge("webhooks")
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def notices(settings: Settings) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """hookgate.subscription.* events as an operator's queue bound to hookgate.events receives them."""
    queue = Queue(f"test-notices-{new_id()}", exchange=events_exchange, routing_key="hookgate.subscription.#",
                  auto_delete=True)
    seen: list[dict[str, Any]] = []
    with Connection(settings.broker_url) as conn:
        bound = queue(conn.default_channel)
        bound.declare()

        def read() -> list[dict[str, Any]]:
            while (message := bound.get(no_ack=True)) is not None:
                seen.append(orjson.loads(message.body))
            return seen

        yield read


def start_worker(settings: Settings, tmp_path: Path, name: str) -> Worker:
    return Worker(settings, tmp_path / f"{name}.log")


def most_at_once(ledger: list[Received], duration_s: float) -> int:
    """The most requests open at the same moment, each open from arrival for ``duration_s``."""
    edges = sorted([(r.at, 1) for r in ledger] + [(r.at + duration_s, -1) for r in ledger])
    current = peak = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def test_breaker_pauses_holds_probes_and_resumes(settings: Settings, sessions: sessionmaker[Session],
                                                 sender: Celery, notices: Callable[[], list[dict[str, Any]]],
                                                 tmp_path: Path) -> None:
    """Four failures pause the endpoint; what comes next is held, one probe at a time goes out; a probe's
    success resumes it and every held delivery is sent. Both changes are published as events."""
    secret = make_secret()
    with Receiver(secret, default=Reply(500)) as receiver, start_worker(settings, tmp_path, "w1"):
        subscription_id = add_subscription(sessions, receiver.url, secret)
        for delivery_id in [add_delivery(sessions, subscription_id) for _ in range(4)]:
            sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        receiver.wait_for(4)
        wait_for(lambda: any(n["type"] == "hookgate.subscription.paused" for n in notices()), 10, "paused")

        held = [add_delivery(sessions, subscription_id) for _ in range(6)]
        sender.send_task("tasks.deliver_webhooks", args=[held], queue="webhooks")
        # Probes at ~1 s, then ~2 s, apart: at most three more requests in 3.5 s, never two at once.
        time.sleep(3.5)
        probes = receiver.ledger[4:]
        assert 1 <= len(probes) <= 3, [(r.webhook_id, r.at) for r in probes]
        assert all(b.at - a.at >= 0.9 for a, b in itertools.pairwise(probes))
        with sessions() as session:
            parked = session.scalar(select(func.count()).where(Delivery.subscription_id == subscription_id,
                                                               Delivery.held_since.is_not(None)))
        # Each probe was taken from the held ones, and one more waits as the next probe.
        assert parked >= 6 - len(probes) - 1

        receiver.respond(*[200] * 20)
        wait_for(lambda: any(n["type"] == "hookgate.subscription.resumed" for n in notices()), 10, "resumed")
        # The probes that failed wait for their own retries (ten minutes); every other one is sent now.
        failed_probes = len([r for r in receiver.ledger[4:] if r.status == 500])
        wait_for(lambda: statuses(sessions, subscription_id).get("succeeded", 0) == 6 - failed_probes, 15,
                 "held ones delivered")
    paused, resumed = (next(n for n in notices() if n["type"] == f"hookgate.subscription.{kind}")
                       for kind in ("paused", "resumed"))
    assert paused["source"] == "hookgate" and paused["data"]["subscription_id"] == subscription_id
    assert "4 of the last 4 attempts failed" in paused["data"]["reason"]
    assert resumed["subject"] == subscription_id
    with sessions() as session:
        health = session.get(EndpointHealth, subscription_id)
        assert health is not None and health.state == "closed" and health.failing_since is None


def test_endpoint_failing_too_long_is_disabled(make_settings: Callable[..., Settings], sqlite_url: str,
                                               sender: Celery, notices: Callable[[], list[dict[str, Any]]],
                                               tmp_path: Path) -> None:
    """Failing without a success for longer than endpoint_disable_after_s disables the subscription."""
    settings = make_settings(database_url=sqlite_url, **{**BREAKER, "breaker_min_attempts": 100,
                                                         "endpoint_disable_after_s": 1.0, "retry_schedule": (0, 1, 1)})
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    secret = make_secret()
    try:
        with Receiver(secret, default=Reply(503)) as receiver, start_worker(settings, tmp_path, "w1"):
            subscription_id = add_subscription(sessions, receiver.url, secret)
            sender.send_task("tasks.deliver_webhook", args=[add_delivery(sessions, subscription_id)],
                             queue="webhooks")
            receiver.wait_for(2, timeout_s=10)
            wait_for(lambda: any(n["type"] == "hookgate.subscription.disabled" for n in notices()), 10, "disabled")
        with sessions() as session:
            subscription = session.get(Subscription, subscription_id)
            assert subscription is not None and not subscription.enabled
            assert subscription.disabled_reason == "the endpoint kept failing"
    finally:
        engine.dispose()


def test_in_flight_limit_holds_across_two_worker_processes(settings: Settings, sessions: sessionmaker[Session],
                                                           sender: Celery, tmp_path: Path) -> None:
    """max_in_flight=2 with two workers: never more than two requests open at once, and every delivery
    arrives once (the held ones are released as sends finish)."""
    secret = make_secret()
    with (
        Receiver(secret, default=Reply(200, delay_s=0.5)) as slow,
        start_worker(settings, tmp_path, "w1"),
        start_worker(settings, tmp_path, "w2"),
    ):
        limited = add_subscription(sessions, slow.url, secret, max_in_flight=2)
        slow_ids = [add_delivery(sessions, limited) for _ in range(12)]
        for delivery_id in slow_ids:
            sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        slow.wait_for(12, timeout_s=30)
        wait_for(lambda: statuses(sessions, limited).get("succeeded", 0) == 12, 10, "all recorded")
    assert most_at_once(slow.ledger, 0.5) <= 2
    assert sorted(r.webhook_id for r in slow.ledger) == sorted(slow_ids)


def test_slow_endpoint_does_not_delay_a_healthy_one(settings: Settings, sessions: sessionmaker[Session],
                                                    sender: Celery, tmp_path: Path) -> None:
    """Eight sends to an endpoint taking 4 s, queued first, do not hold up a healthy endpoint's deliveries:
    a task hands its sends to the process's threads and takes the next task at once."""
    secret = make_secret()
    with (
        Receiver(secret, default=Reply(200, delay_s=4)) as slow,
        Receiver(secret) as healthy,
        start_worker(settings, tmp_path, "w1"),
    ):
        slow_subscription = add_subscription(sessions, slow.url, secret)
        for _ in range(8):
            sender.send_task("tasks.deliver_webhook", args=[add_delivery(sessions, slow_subscription)],
                             queue="webhooks")
        healthy_ids = [add_delivery(sessions, add_subscription(sessions, healthy.url, secret)) for _ in range(5)]
        sender.send_task("tasks.deliver_webhooks", args=[healthy_ids], queue="webhooks")
        healthy.wait_for(5, timeout_s=15)
        slow.wait_for(8, timeout_s=15)
        wait_for(lambda: statuses(sessions, slow_subscription).get("succeeded", 0) == 8, 20, "slow ones recorded")
    # All healthy deliveries arrived before the first slow request was answered: none waited for one.
    assert max(r.at for r in healthy.ledger) < min(r.at for r in slow.ledger) + 4.0


def warm_up(sessions: sessionmaker[Session], sender: Celery, secret: str) -> None:
    """A first send in each pool process: making its threads and HTTP clients takes a moment."""
    with Receiver(secret) as receiver:
        subscription_id = add_subscription(sessions, receiver.url, secret)
        ids = [add_delivery(sessions, subscription_id) for _ in range(16)]
        for start in range(0, 16, 4):
            sender.send_task("tasks.deliver_webhooks", args=[ids[start:start + 4]], queue="webhooks")
        receiver.wait_for(16)


def test_rate_limit_spaces_sends_across_two_worker_processes(settings: Settings, sessions: sessionmaker[Session],
                                                             sender: Celery, tmp_path: Path) -> None:
    """rate_limit_per_s=4 with two workers: no send before its slot, a quarter of a second apart; all delivered."""
    secret = make_secret()
    with Receiver(secret) as receiver, start_worker(settings, tmp_path, "w1"), start_worker(settings, tmp_path, "w2"):
        warm_up(sessions, sender, secret)
        limited = add_subscription(sessions, receiver.url, secret, rate_limit_per_s=4.0)
        ids = [add_delivery(sessions, limited) for _ in range(12)]
        sender.send_task("tasks.deliver_webhooks", args=[ids[:6]], queue="webhooks")
        sender.send_task("tasks.deliver_webhooks", args=[ids[6:]], queue="webhooks")
        ledger = receiver.wait_for(12, timeout_s=20)
        wait_for(lambda: statuses(sessions, limited).get("succeeded", 0) == 12, 10, "all recorded")
    arrivals = sorted(r.at for r in ledger)
    assert sorted(r.webhook_id for r in ledger) == sorted(ids)
    # Twelve slots a quarter of a second apart span 2.75 s; scheduling may make a send late, never early,
    # so no 1-second window holds more than four sends plus one that ran late.
    assert arrivals[-1] - arrivals[0] >= 2.5, [round(t - arrivals[0], 2) for t in arrivals]
    assert max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals) <= 5


async def test_deliveries_of_a_disabled_subscription_wait_and_go_when_enabled(
        settings: Settings, sessions: sessionmaker[Session], sender: Celery, tmp_path: Path) -> None:
    """A disabled subscription's deliveries are held, not dropped; enabling it over the API sends each once."""
    secret = make_secret()
    with Receiver(secret) as receiver, start_worker(settings, tmp_path, "w1"):
        subscription_id = add_subscription(sessions, receiver.url, secret)
        with sessions.begin() as session:
            session.execute(update(Subscription).where(Subscription.id == subscription_id)
                            .values(enabled=False, disabled_reason="the endpoint answered HTTP 410"))
        ids = [add_delivery(sessions, subscription_id) for _ in range(3)]
        sender.send_task("tasks.deliver_webhooks", args=[ids], queue="webhooks")

        def held() -> int:
            with sessions() as session:
                return session.scalar(select(func.count()).where(Delivery.held_since.is_not(None),
                                                                 Delivery.subscription_id == subscription_id)) or 0

        wait_for(lambda: held() == 3, 10, "held")
        assert receiver.ledger == []
        async with running_gateway(settings) as gateway:
            assert await gateway.app.state.publisher.wait_connected(10)
            response = await gateway.client.patch(f"/v1/subscriptions/{subscription_id}", json={"enabled": True},
                                                  headers=gateway.auth(Scope.SUBSCRIPTIONS))
            assert response.status_code == 200, response.text
        receiver.wait_for(3)
        wait_for(lambda: statuses(sessions, subscription_id) == {"succeeded": 3}, 10, "delivered")
    assert sorted(r.webhook_id for r in receiver.ledger) == sorted(ids)
    with sessions() as session:
        assert session.get(Subscription, subscription_id).disabled_reason is None


def test_410_disable_is_announced_once(settings: Settings, sessions: sessionmaker[Session], sender: Celery,
                                       notices: Callable[[], list[dict[str, Any]]], tmp_path: Path) -> None:
    """Two deliveries answered 410 disable their subscription, published once as hookgate.subscription.disabled."""
    secret = make_secret()
    with Receiver(secret, default=Reply(410)) as receiver, start_worker(settings, tmp_path, "w1"):
        subscription_id = add_subscription(sessions, receiver.url, secret)
        ids = [add_delivery(sessions, subscription_id) for _ in range(2)]
        sender.send_task("tasks.deliver_webhooks", args=[ids], queue="webhooks")
        wait_for(lambda: statuses(sessions, subscription_id) == {"dead": 2}, 10, "both dead")
        wait_for(lambda: any(n["type"] == "hookgate.subscription.disabled" for n in notices()), 10, "disabled")
        # A second announcement, were there one, is published with the same batch or the next one.
        time.sleep(1.0)
    disabled = [n for n in notices() if n["type"] == "hookgate.subscription.disabled"]
    assert [(n["subject"], n["data"]) for n in disabled] == [
        (subscription_id, {"subscription_id": subscription_id, "reason": "the endpoint answered HTTP 410"})]


def test_announcement_the_broker_refuses_is_kept_and_sent_by_the_sweep(
        make_settings: Callable[..., Settings], settings: Settings, sessions: sessionmaker[Session], sender: Celery,
        tmp_path: Path) -> None:
    """A transition announced while RabbitMQ is unreachable is stored as an event with its deliveries, and the
    stuck-delivery sweep then sends it to the operator's subscription."""
    secret = make_secret()
    with Receiver(secret) as operator:
        watcher = add_subscription(sessions, operator.url, secret)
        with sessions.begin() as session:
            session.execute(update(Subscription).where(Subscription.id == watcher)
                            .values(event_types=["hookgate.subscription.*"]))
        unreachable = make_celery(make_settings(broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}//"))
        try:
            announce(unreachable, sessions, [Transition("sub-1", TransitionKind.PAUSED, "5 of the last 5 failed")])
        finally:
            unreachable.close()
        assert statuses(sessions, watcher) == {"pending": 1}

        swept = settings.model_copy(update={"sweep_stuck_after_s": 0.5})
        with start_worker(swept, tmp_path, "w1"):
            time.sleep(0.6)  # the sweep takes deliveries left alone that long
            sender.send_task("tasks.sweep_stuck_deliveries", queue="webhooks")
            (notice,) = operator.wait_for(1)
            wait_for(lambda: statuses(sessions, watcher) == {"succeeded": 1}, 10, "notice recorded")
    assert notice.verified and notice.json()["type"] == "hookgate.subscription.paused"
    assert notice.json()["data"] == {"subscription_id": "sub-1", "reason": "5 of the last 5 failed"}


def test_slow_endpoint_under_max_in_flight_leaves_threads_for_a_healthy_one(
        settings: Settings, sessions: sessionmaker[Session], sender: Celery, tmp_path: Path) -> None:
    """Forty sends to an endpoint taking 30 s, queued first, with max_in_flight=4 below each process's eight
    sending threads: the healthy endpoint's deliveries arrive before the first slow answer."""
    # Eight threads per process make saturation cheap to reach; without the limit the forty would take all
    # sixteen and the healthy tasks would wait 30 s behind them. A lease longer than the 30-s send.
    few_threads = settings.model_copy(update={"webhook_concurrency": 8, "webhook_timeout_s": 40.0,
                                              "task_time_limit_s": 60})
    secret = make_secret()
    # The receivers close first, cutting the slow requests short, so the worker stops without waiting on them.
    with (
        start_worker(few_threads, tmp_path, "w1"),
        Receiver(secret, default=Reply(200, delay_s=30)) as slow,
        Receiver(secret) as healthy,
    ):
        slow_subscription = add_subscription(sessions, slow.url, secret, max_in_flight=4)
        for _ in range(40):
            sender.send_task("tasks.deliver_webhook", args=[add_delivery(sessions, slow_subscription)],
                             queue="webhooks")
        slow.wait_for(1)
        healthy_ids = [add_delivery(sessions, add_subscription(sessions, healthy.url, secret)) for _ in range(5)]
        sender.send_task("tasks.deliver_webhooks", args=[healthy_ids], queue="webhooks")
        healthy.wait_for(5, timeout_s=20)
        slow_requests = slow.ledger
    assert max(r.at for r in healthy.ledger) < min(r.at for r in slow_requests) + 30
    assert len(slow_requests) == 4
