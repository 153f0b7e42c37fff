"""Email when things break: the fallback SMTP server takes over, and a worker killed mid-send sends once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from consumers.celery_app import make_celery
from consumers.store.database import make_engine, make_sessionmaker
from schemas.settings import Settings
from tests.channel_seeding import add_channel_subscription, add_event_delivery, email_fields, load, wait_status
from tests.smtpserver import SmtpSink
from tests.workers import Worker, free_port, wait_until

# A short lease (hard limit 4 s + margin 2 s), so the look after a killed worker's lease comes quickly.
FAST = {"retry_schedule": (0, 1, 1), "smtp_timeout_s": 3.0, "task_soft_time_limit_s": 3, "task_time_limit_s": 4,
        "lease_margin_s": 2}


@pytest.fixture(scope="module")
def sessions(module_store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(module_store_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def sender(broker_url: str) -> Iterator[Celery]:
    app = make_celery(Settings(broker_url=broker_url))
    yield app
    app.close()


def _settings(broker_url: str, store_url: str, **smtp: object) -> Settings:
    return Settings(broker_url=broker_url, database_url=store_url, **{**FAST, **smtp})  # type: ignore[arg-type]


def test_the_fallback_server_sends_when_the_primary_is_down(
        broker_url: str, module_store_url: str, sessions: sessionmaker[Session], sender: Celery,
        tmp_path: Path) -> None:
    """With nothing listening on the primary's port, the fallback server gets the email at the first attempt,
    and the attempt records that it was the fallback that answered."""
    with SmtpSink() as fallback:
        settings = _settings(broker_url, module_store_url, smtp_host="127.0.0.1", smtp_port=free_port(),
                             smtp_fallback_host="127.0.0.1", smtp_fallback_port=fallback.port)
        subscription_id = add_channel_subscription(sessions, email_fields(to=["fallback@example.com"]))
        _, delivery_id = add_event_delivery(sessions, subscription_id, {"order_id": 1, "customer": {"name": "F"}})
        with Worker(settings, tmp_path / "worker.log", queues=["email"]):
            sender.send_task("tasks.send_email", args=[delivery_id], queue="email")
            _, attempts = wait_status(sessions, delivery_id, "succeeded")
        assert len(fallback.messages_to("fallback@example.com")) == 1

    assert [(a.number, a.status_code) for a in attempts] == [(1, 250)]
    assert attempts[0].response_body is not None and f"127.0.0.1:{fallback.port}" in attempts[0].response_body


def test_both_servers_down_is_a_failed_attempt_that_retries(
        broker_url: str, module_store_url: str, sessions: sessionmaker[Session], sender: Celery,
        tmp_path: Path) -> None:
    """When neither server answers, each attempt fails naming both, and the schedule runs out to dead."""
    settings = _settings(broker_url, module_store_url, smtp_host="127.0.0.1", smtp_port=free_port(),
                         smtp_fallback_host="127.0.0.1", smtp_fallback_port=free_port())
    subscription_id = add_channel_subscription(sessions, email_fields(to=["nobody-up@example.com"]))
    _, delivery_id = add_event_delivery(sessions, subscription_id, {"order_id": 2, "customer": {"name": "N"}})
    with Worker(settings, tmp_path / "worker.log", queues=["email"]):
        sender.send_task("tasks.send_email", args=[delivery_id], queue="email")
        delivery, attempts = wait_status(sessions, delivery_id, "dead")

    assert [a.number for a in attempts] == [1, 2, 3]
    assert all(a.error and "unreachable" in a.error and "after the primary server" in a.error for a in attempts)
    assert delivery.last_error == attempts[-1].error


def test_a_worker_killed_while_the_server_holds_the_data_sends_the_email_once(
        broker_url: str, module_store_url: str, sessions: sessionmaker[Session], sender: Celery,
        tmp_path: Path) -> None:
    """SIGKILL of the worker while the SMTP server has not yet answered the data: nothing is accepted, the task
    comes back to the restarted worker, finds the delivery `sending` under the dead worker's lease, looks again
    once it has run out, and the email is then sent exactly once."""
    with SmtpSink() as smtp:
        settings = _settings(broker_url, module_store_url, smtp_host="127.0.0.1", smtp_port=smtp.port,
                             smtp_timeout_s=30.0, task_soft_time_limit_s=30, task_time_limit_s=4)
        subscription_id = add_channel_subscription(sessions, email_fields(to=["killed@example.com"]))
        _, delivery_id = add_event_delivery(sessions, subscription_id, {"order_id": 3, "customer": {"name": "K"}})
        smtp.stall_s = 60.0
        worker = Worker(settings, tmp_path / "worker.log", queues=["email"])
        with worker:
            sender.send_task("tasks.send_email", args=[delivery_id], queue="email")
            wait_until(lambda: smtp.data_commands == 1, "the worker to send the data")
            assert load(sessions, delivery_id)[0].status == "sending"
            os.killpg(worker.pid, signal.SIGKILL)
            smtp.stall_s = 0.0
            time.sleep(0.5)
        # A worker with a normal time limit: the redelivered task, then the look after the lease.
        with Worker(_settings(broker_url, module_store_url, smtp_host="127.0.0.1", smtp_port=smtp.port),
                    tmp_path / "worker2.log", queues=["email"]):
            delivery, attempts = wait_status(sessions, delivery_id, "succeeded", timeout_s=30)
            time.sleep(1.0)
        assert len(smtp.messages_to("killed@example.com")) == 1

    # The killed attempt was never recorded; the one that sent is the second claim.
    assert [(a.number, a.status_code) for a in attempts] == [(2, 250)]
    assert delivery.attempts_count == 2
