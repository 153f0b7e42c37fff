"""Retries waiting in the broker survive the worker that scheduled them."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from kombu import Connection

from consumers.celery_app import make_celery
from consumers.store.database import make_engine, make_sessionmaker
from consumers.topology import declare_topology
from schemas.settings import Settings
from tests.rabbitnode import RabbitNode
from tests.receiver import Receiver, make_secret
from tests.seeding import add_delivery, add_subscription, statuses, wait_for
from tests.workers import Worker


def test_worker_killed_with_retries_pending_loses_none(make_settings: Callable[..., Settings], store_url: str,
                                                       tmp_path: Path) -> None:
    """Forty deliveries fail once and wait 15 s for their retry; the worker is SIGKILLed meanwhile and a new
    one started: every delivery succeeds, each sent exactly twice (the 503, then the 200)."""
    # No breaker here: forty failures in a row would pause the endpoint.
    settings = make_settings(database_url=store_url, retry_schedule=(0, 15), endpoint_max_in_flight=100,
                             breaker_min_attempts=1000)
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge("webhooks")
    engine = make_engine(store_url)
    sessions = make_sessionmaker(engine)
    sender = make_celery(settings)
    secret = make_secret()
    try:
        with Receiver(secret, script=[503] * 40) as receiver:
            subscription_id = add_subscription(sessions, receiver.url, secret)
            ids = [add_delivery(sessions, subscription_id) for _ in range(40)]
            with Worker(settings, tmp_path / "first.log") as first:
                for start in range(0, 40, 8):
                    sender.send_task("tasks.deliver_webhooks", args=[ids[start:start + 8]], queue="webhooks")
                receiver.wait_for(40, timeout_s=12)
                wait_for(lambda: statuses(sessions, subscription_id).get("retrying", 0) == 40, 5, "40 retrying")
                os.killpg(first.pid, signal.SIGKILL)
            with Worker(settings, tmp_path / "second.log"):
                wait_for(lambda: statuses(sessions, subscription_id).get("succeeded", 0) == 40, 45, "all delivered")
            sent = Counter(r.webhook_id for r in receiver.ledger)
    finally:
        sender.close()
        engine.dispose()
    assert set(sent) == set(ids) and set(sent.values()) == {2}


def test_broker_restarted_with_retries_pending_loses_none_and_sends_none_twice(
        make_settings: Callable[..., Settings], sqlite_url: str, tmp_path: Path) -> None:
    """Twenty retries wait in a private RabbitMQ node's delayed queues while it is stopped and started
    again: after the restart each is sent once, so every delivery reaches the receiver exactly twice."""
    with RabbitNode(tmp_path / "rabbit") as node:
        settings = make_settings(broker_url=node.url, database_url=sqlite_url, retry_schedule=(0, 20),
                                 breaker_min_attempts=1000)
        with Connection(settings.broker_url) as conn:
            declare_topology(conn)
        engine = make_engine(sqlite_url)
        sessions = make_sessionmaker(engine)
        sender = make_celery(settings)
        secret = make_secret()
        try:
            with Receiver(secret, script=[503] * 20) as receiver, Worker(settings, tmp_path / "worker.log"):
                subscription_id = add_subscription(sessions, receiver.url, secret)
                ids = [add_delivery(sessions, subscription_id) for _ in range(20)]
                sender.send_task("tasks.deliver_webhooks", args=[ids], queue="webhooks")
                receiver.wait_for(20, timeout_s=15)
                wait_for(lambda: statuses(sessions, subscription_id).get("retrying", 0) == 20, 5, "20 retrying")
                node.stop()
                node.start()
                wait_for(lambda: statuses(sessions, subscription_id).get("succeeded", 0) == 20, 60, "all delivered")
                sent = Counter(r.webhook_id for r in receiver.ledger)
        finally:
            sender.close()
            engine.dispose()
    assert set(sent) == set(ids) and set(sent.values()) == {2}
