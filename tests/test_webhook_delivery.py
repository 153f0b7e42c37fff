"""Webhook delivery end to end: a real Celery worker, real RabbitMQ, a verifying receiver, both stores."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.celery_app import make_celery
from consumers.retry_policy import RetryPolicy
from consumers.signing import sign
from consumers.store import deliveries
from consumers.store.database import make_engine, make_sessionmaker, migrate, utcnow
from consumers.store.deliveries import AttemptRecord, DeliveryJob, SkipReason
from consumers.store.models import Attempt, Delivery, Event, Subscription
from consumers.tasks.webhooks import USER_AGENT, webhook_body
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import running_gateway
from tests.receiver import Receiver, Reply, make_secret
from tests.vhosts import fresh_vhost
from tests.workers import Worker, free_port, settings_env

# One worker per store serves most tests; these settings keep retries and time limits short.
SCHEDULE = (0, 1, 1)
FAST_RETRIES = {
    "retry_schedule": SCHEDULE,
    "webhook_timeout_s": 5.0,
    "task_soft_time_limit_s": 1,
    "task_time_limit_s": 10,
}
# The longest wait that schedule alone gives: 1 s with +20 % jitter, rounded up to whole seconds: 2 s.
SCHEDULED_WAIT_MAX_S = math.ceil(max(SCHEDULE) * (1 + RetryPolicy(SCHEDULE, 0).jitter))
# What the Retry-After tests ask for: clearly beyond that, so without Retry-After support they fail.
RETRY_AFTER_S = SCHEDULED_WAIT_MAX_S + 2


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated store shared by the module's worker (``store_url`` is per test; a worker start is ~2 s)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'hookgate.db'}"
    else:
        url = request.getfixturevalue("pg_database")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    migrate(url)
    return url


@pytest.fixture(scope="module")
def sessions(shared_store: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(shared_store)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def module_settings(broker_url: str, shared_store: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=shared_store, allow_private_targets=True,
                    **FAST_RETRIES)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def worker(module_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with Worker(module_settings, tmp_path_factory.mktemp("worker") / "worker.log") as running:
        yield running


@pytest.fixture(scope="module")
def sender(module_settings: Settings) -> Iterator[Celery]:
    app = make_celery(module_settings)
    yield app
    app.close()


@pytest.fixture
def enqueue(sender: Celery, worker: Worker, request: pytest.FixtureRequest) -> Iterator[Callable[[str], None]]:
    """Send ``tasks.deliver_webhook`` for a delivery id; the worker's log goes to the terminal if the test fails."""
    failed_before = request.session.testsfailed
    yield lambda delivery_id: sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
    if request.session.testsfailed > failed_before:
        # Output printed at teardown is not shown with the failure; the terminal reporter is.
        terminal = request.config.pluginmanager.get_plugin("terminalreporter")
        terminal.write_line(f"--- worker log {worker.log_path} (tail) ---\n{worker.log_text()[-20000:]}")


# -- helpers ---------------------------------------------------------------------------------------


def seed(sessions: sessionmaker[Session], url: str, secret: str, *, status: str = "pending",
         data: Any = None, enabled: bool = True, retry_schedule: list[float] | None = None) -> str:
    """A subscription, an event (structured CloudEvent body) and one delivery; returns the delivery id."""
    now = utcnow()
    event = CloudEvent(id=new_id(), source="tests/delivery", type="order.created",
                       data={"order": 42} if data is None else data, time=now)
    subscription_id, event_pk, delivery_id = new_id(), new_id(), new_id()
    with sessions.begin() as session:
        session.add(Subscription(id=subscription_id, channel="webhook", event_types=["order.*"], url=url,
                                 secret=secret, description="", enabled=enabled, options={}, created_at=now,
                                 updated_at=now, retry_schedule=retry_schedule))
        session.add(Event(pk=event_pk, id=event.id, source=event.source, type=event.type, time=event.time,
                          body=event.to_json().decode(), received_at=now))
        session.flush()
        session.add(Delivery(id=delivery_id, event_pk=event_pk, subscription_id=subscription_id, status=status,
                             attempts_count=0, created_at=now, updated_at=now))
    return delivery_id


def load(sessions: sessionmaker[Session], delivery_id: str) -> tuple[Delivery, list[Attempt]]:
    with sessions() as session:
        # Attempts first: on PostgreSQL each statement sees the latest commit, so the delivery read
        # after them is at least as new as they are (an attempt and its delivery's state commit together).
        attempts = session.scalars(select(Attempt).where(Attempt.delivery_id == delivery_id)
                                   .order_by(Attempt.number)).all()
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        return delivery, list(attempts)


def wait_until(sessions: sessionmaker[Session], delivery_id: str, done: Callable[[Delivery, list[Attempt]], bool],
               timeout_s: float = 15.0) -> tuple[Delivery, list[Attempt]]:
    deadline = time.monotonic() + timeout_s
    while True:
        delivery, attempts = load(sessions, delivery_id)
        if done(delivery, attempts):
            # Read again: a status seen here may have committed after its attempts were read, and
            # this second read of the attempts comes after that commit.
            return load(sessions, delivery_id)
        if time.monotonic() > deadline:
            raise AssertionError(f"delivery {delivery_id} stuck at {delivery.status}, {len(attempts)} attempt(s): "
                                 f"{[(a.number, a.status_code, a.error) for a in attempts]}")
        time.sleep(0.05)


def finished(status: DeliveryStatus) -> Callable[[Delivery, list[Attempt]], bool]:
    return lambda delivery, _attempts: delivery.status == status.value


def attempts_at_least(count: int) -> Callable[[Delivery, list[Attempt]], bool]:
    return lambda _delivery, attempts: len(attempts) >= count


def wait_for_log(worker: Worker, *needles: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(all(n in line for n in needles) for line in worker.log_text().splitlines()):
        if time.monotonic() > deadline:
            raise AssertionError(f"the worker never logged a line with {needles}")
        time.sleep(0.05)


def stop_retrying(sessions: sessionmaker[Session], delivery_id: str) -> None:
    """Cancel a delivery so its scheduled retry finds nothing to send (and the next test a quiet worker)."""
    with sessions.begin() as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(status="cancelled"))


def delayed_messages(broker_url: str) -> int:
    """Messages waiting now in Celery's delayed-delivery queues (``celery_delayed_0..27``).

    Passive declares, because ``rabbitmqctl list_queues`` shows quorum-queue counts seconds late.
    """
    with Connection(broker_url) as connection, connection.channel() as channel:
        return sum(channel.queue_declare(queue=f"celery_delayed_{level}", passive=True).message_count
                   for level in range(28))


@contextmanager
def private_broker(settings: Settings, log_path: Path) -> Iterator[tuple[str, Celery, Worker]]:
    """A vhost of the test's own, with a worker and a sender on it: its broker URL, the sender, the worker.

    Counts of parked messages are exact only there: the module's earlier tests leave rechecks parked
    for the length of a lease (40 s here), and one leaving while a test counts hides one of its own.
    """
    with fresh_vhost() as broker_url:
        own = settings.model_copy(update={"broker_url": broker_url})
        app = make_celery(own)
        try:
            with Worker(own, log_path) as worker:
                yield broker_url, app, worker
        finally:
            app.close()


def parked_within(broker_url: str, expected: int, timeout_s: float) -> int:
    """The delayed-delivery count once it reaches ``expected``, or what it is after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (parked := delayed_messages(broker_url)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return parked


# -- end to end through a real worker ---------------------------------------------------------------


def test_delivery_arrives_signed_and_succeeds(sessions: sessionmaker[Session], enqueue: Callable[[str], None]) -> None:
    """A delivery is POSTed once, verified by standardwebhooks, with the Standard Webhooks body, and succeeds."""
    secret = make_secret()
    long_body = b"thanks" + b"." * 10_000
    with Receiver(secret, default=Reply(200, headers={"x-receipt": "r-1"}, body=long_body)) as receiver:
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        (received,) = receiver.wait_for(1)
        delivery, attempts = wait_until(sessions, delivery_id, finished(DeliveryStatus.SUCCEEDED))

    assert received.verified, received.error
    assert received.webhook_id == delivery_id
    assert received.headers["content-type"] == "application/json"
    assert received.headers["user-agent"] == USER_AGENT
    body = received.json()
    assert set(body) == {"type", "timestamp", "data"}
    assert body["type"] == "order.created" and body["data"] == {"order": 42}
    assert delivery.attempts_count == 1 and delivery.lease_until is None and delivery.last_error is None
    (attempt,) = attempts
    assert (attempt.number, attempt.status_code, attempt.error) == (1, 200, None)
    # Only the first 4 KiB of a response body is kept.
    assert attempt.response_body == long_body[:4096].decode() and attempt.response_headers["x-receipt"] == "r-1"
    assert attempt.duration_ms > 0


def test_retries_keep_the_webhook_id_until_success(sessions: sessionmaker[Session],
                                                   enqueue: Callable[[str], None]) -> None:
    """Two 503s then a 200: three signed requests with one webhook-id, spaced by the backoff, then succeeded."""
    secret = make_secret()
    with Receiver(secret, script=[503, 503]) as receiver:
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        first, second, third = receiver.wait_for(3, timeout_s=20)
        delivery, attempts = wait_until(sessions, delivery_id, finished(DeliveryStatus.SUCCEEDED))

    assert {r.webhook_id for r in (first, second, third)} == {delivery_id}
    assert all(r.verified for r in (first, second, third))
    # Backoff base 0.5 s, in the broker's whole seconds: 1 s, then 1 s.
    assert second.at - first.at >= 0.9
    assert third.at - second.at >= 0.9
    assert [(a.number, a.status_code) for a in attempts] == [(1, 503), (2, 503), (3, 200)]
    assert attempts[0].error == "HTTP 503"
    assert delivery.attempts_count == 3 and delivery.last_error is None


def test_same_delivery_enqueued_twice_is_sent_once(sessions: sessionmaker[Session], worker: Worker,
                                                   enqueue: Callable[[str], None]) -> None:
    """Two tasks for one delivery, running side by side in the pool, produce exactly one request."""
    secret = make_secret()
    with Receiver(secret, default=Reply(200, delay_s=0.3)) as receiver:
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        enqueue(delivery_id)
        wait_for_log(worker, "webhook delivery skipped", delivery_id)
        wait_until(sessions, delivery_id, finished(DeliveryStatus.SUCCEEDED))
        assert len(receiver.ledger) == 1


def test_finished_delivery_is_never_sent_again(sessions: sessionmaker[Session], worker: Worker,
                                               enqueue: Callable[[str], None]) -> None:
    """A task for a delivery already succeeded makes no request and changes nothing."""
    secret = make_secret()
    with Receiver(secret) as receiver:
        delivery_id = seed(sessions, receiver.url, secret, status="succeeded")
        enqueue(delivery_id)
        wait_for_log(worker, "webhook delivery skipped", delivery_id, "already finished")
        assert receiver.ledger == []
    delivery, attempts = load(sessions, delivery_id)
    assert (delivery.status, delivery.attempts_count, attempts) == ("succeeded", 0, [])


def test_redirect_is_a_failure_and_not_followed(sessions: sessionmaker[Session],
                                               enqueue: Callable[[str], None]) -> None:
    """A 302 is recorded as a failed attempt and its Location is never requested."""
    secret = make_secret()
    with Receiver(secret) as receiver:
        receiver.respond(Reply(302, headers={"location": receiver.base_url + "/moved"}))
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        delivery, attempts = wait_until(sessions, delivery_id, attempts_at_least(1))
        stop_retrying(sessions, delivery_id)
        time.sleep(0.2)
        assert [r.path for r in receiver.ledger] == ["/hook"]
    assert (attempts[0].status_code, attempts[0].error) == (302, "HTTP 302")
    assert delivery.status == "retrying" and delivery.next_attempt_at is not None


def test_exhausted_schedule_ends_dead(sessions: sessionmaker[Session], enqueue: Callable[[str], None]) -> None:
    """An endpoint that always fails gets one request per step of its schedule, each recorded, then it is dead."""
    secret = make_secret()
    with Receiver(secret, default=Reply(500, body=b"boom")) as receiver:
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        delivery, attempts = wait_until(sessions, delivery_id, finished(DeliveryStatus.DEAD), timeout_s=20)
        assert len(receiver.ledger) == 3
    assert [(a.number, a.status_code, a.response_body) for a in attempts] == [(n, 500, "boom") for n in (1, 2, 3)]
    assert delivery.last_error == "HTTP 500" and delivery.lease_until is None and delivery.next_attempt_at is None


def test_retry_waits_in_the_broker_and_honours_retry_after(sessions: sessionmaker[Session], module_settings: Settings,
                                                          tmp_path: Path) -> None:
    """A 503 with Retry-After: 4 parks the retry in RabbitMQ's delayed queues, and it arrives 4 s later, not
    after the schedule's 1-2 s.

    The task's recheck (a look after the lease, in case the worker dies mid-send) is parked there too.
    """
    secret = make_secret()
    with (Receiver(secret, script=[Reply(503, headers={"retry-after": str(RETRY_AFTER_S)})]) as receiver,
          private_broker(module_settings, tmp_path / "worker.log") as (broker_url, app, _worker)):
        delivery_id = seed(sessions, receiver.url, secret)
        app.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        receiver.wait_for(1)
        # The retry is published just after the attempt; look while it waits.
        assert parked_within(broker_url, 2, timeout_s=1.5) == 2
        first, second = receiver.wait_for(2, timeout_s=10)
        wait_until(sessions, delivery_id, finished(DeliveryStatus.SUCCEEDED))
    gap = second.at - first.at
    # Beyond anything the schedule alone gives: only the Retry-After explains it.
    assert gap > SCHEDULED_WAIT_MAX_S + 1 and gap >= RETRY_AFTER_S - 0.1


def test_retry_due_hours_ahead_is_parked_in_the_broker_not_the_worker(
        sessions: sessionmaker[Session], module_settings: Settings, tmp_path: Path) -> None:
    """A 503 with Retry-After: 36000 under a one-day cap parks a 10-hour retry in the delayed queues: the
    worker holds no task (neither reserved nor scheduled), and the delivery stays retrying until cancelled."""
    secret = make_secret()
    capped_at_a_day = module_settings.model_copy(update={"retry_after_max_s": 86400.0})
    with (Receiver(secret, script=[Reply(503, headers={"retry-after": "36000"})]) as receiver,
          private_broker(capped_at_a_day, tmp_path / "worker.log") as (broker_url, app, worker)):
        delivery_id = seed(sessions, receiver.url, secret)
        app.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        # Retrying with its attempt read: attempts are read first, so the delivery read is at least as new.
        delivery, attempts = wait_until(sessions, delivery_id, attempts_at_least(1))
        assert delivery.status == "retrying"
        # The 10-hour retry and the 45-second recheck.
        assert parked_within(broker_url, 2, timeout_s=3) == 2
        node = f"{worker.name}@{socket.gethostname()}"
        inspect = app.control.inspect(destination=[node], timeout=5)
        assert inspect.reserved() == {node: []}
        assert inspect.scheduled() == {node: []}
        assert len(receiver.ledger) == 1 and load(sessions, delivery_id)[0].status == "retrying"
        assert deliveries.cancel(sessions, delivery_id, "test over")
    assert delivery.next_attempt_at is not None
    wait_s = (delivery.next_attempt_at - attempts[0].started_at).total_seconds()
    assert 36000 <= wait_s < 36010
    assert load(sessions, delivery_id)[0].status == "cancelled"


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_429_retry_after_is_honoured(form: str, sessions: sessionmaker[Session],
                                     enqueue: Callable[[str], None]) -> None:
    """A 429 whose Retry-After asks for 4 s, in seconds or as an HTTP date, is not retried before then
    (the schedule alone would wait 2 s at most)."""
    secret = make_secret()
    if form == "seconds":
        retry_after = str(RETRY_AFTER_S)
    else:
        # A date has whole-second precision: one a second further ahead still asks for RETRY_AFTER_S at least.
        retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=RETRY_AFTER_S + 1), usegmt=True)
    with Receiver(secret, script=[Reply(429, headers={"retry-after": retry_after})]) as receiver:
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        first, second = receiver.wait_for(2, timeout_s=15)
        _, attempts = wait_until(sessions, delivery_id, finished(DeliveryStatus.SUCCEEDED))
    gap = second.at - first.at
    assert gap > SCHEDULED_WAIT_MAX_S + 1 and gap >= RETRY_AFTER_S - 0.1
    assert [(a.status_code, a.response_headers["retry-after"]) for a in attempts[:1]] == [(429, retry_after)]


def test_subscription_schedule_replaces_the_default(sessions: sessionmaker[Session],
                                                    enqueue: Callable[[str], None]) -> None:
    """A subscription's own retry_schedule [0, 3] decides: two attempts 3 s apart, then dead, where the
    module's default would make three, at most 2 s apart."""
    secret = make_secret()
    with Receiver(secret, default=Reply(500)) as receiver:
        delivery_id = seed(sessions, receiver.url, secret, retry_schedule=[0, 3])
        enqueue(delivery_id)
        wait_until(sessions, delivery_id, finished(DeliveryStatus.DEAD), timeout_s=20)
        first, second = receiver.ledger
    # Read again: the wait may have read the attempts just before the last one committed.
    assert [a.number for a in load(sessions, delivery_id)[1]] == [1, 2]
    gap = second.at - first.at
    # 3 s less 20 % jitter, rounded up, is still 3 s: beyond anything the default schedule gives.
    assert gap > SCHEDULED_WAIT_MAX_S + 0.5 and gap >= 2.9


def test_410_gone_disables_the_subscription(sessions: sessionmaker[Session],
                                            enqueue: Callable[[str], None]) -> None:
    """410 ends the delivery dead at once and disables its subscription, with the reason recorded."""
    secret = make_secret()
    with Receiver(secret, default=Reply(410)) as receiver:
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        delivery, attempts = wait_until(sessions, delivery_id, finished(DeliveryStatus.DEAD))
        time.sleep(1.5)  # the schedule's next step would have come by now
        assert len(receiver.ledger) == 1
    with sessions() as session:
        subscription = session.execute(
            select(Subscription).where(Subscription.id == delivery.subscription_id)).scalar_one()
    assert not subscription.enabled and subscription.disabled_reason == "the endpoint answered HTTP 410"
    assert [a.status_code for a in attempts] == [410]


async def test_dead_delivery_comes_back_with_retry_and_recover(sessions: sessionmaker[Session],
                                                              module_settings: Settings,
                                                              enqueue: Callable[[str], None]) -> None:
    """A short schedule spent: dead. The API's retry sends it again and it succeeds; recover does the same."""
    secret = make_secret()
    with Receiver(secret, default=Reply(500)) as receiver:
        first = seed(sessions, receiver.url, secret)
        enqueue(first)
        wait_until(sessions, first, finished(DeliveryStatus.DEAD), timeout_s=20)
        receiver.respond(Reply(200))
        async with running_gateway(module_settings) as gateway:
            assert await gateway.app.state.publisher.wait_connected(10)
            retried = await gateway.client.post(f"/v1/deliveries/{first}/retry",
                                                headers=gateway.auth(Scope.SUBSCRIPTIONS))
            assert retried.status_code == 202, retried.text
            _, attempts = wait_until(sessions, first, finished(DeliveryStatus.SUCCEEDED))
            assert [a.status_code for a in attempts] == [500, 500, 500, 200]

            receiver.respond(Reply(500))
            second = seed(sessions, receiver.url, secret)
            subscription_id = load(sessions, second)[0].subscription_id
            enqueue(second)
            wait_until(sessions, second, finished(DeliveryStatus.DEAD), timeout_s=20)
            receiver.respond(Reply(200))
            since = (utcnow() - timedelta(minutes=1)).isoformat()
            recovered = await gateway.client.post(f"/v1/subscriptions/{subscription_id}/recover",
                                                  json={"since": since}, headers=gateway.auth(Scope.SUBSCRIPTIONS))
            assert recovered.json() == {"recovered": 1}
            _, attempts = wait_until(sessions, second, finished(DeliveryStatus.SUCCEEDED))
            assert [a.status_code for a in attempts] == [500, 500, 500, 200]
    assert {r.webhook_id for r in receiver.ledger} == {first, second}


def test_batch_task_sends_in_parallel_and_retries_a_failure_alone(sessions: sessionmaker[Session],
                                                                    sender: Celery, worker: Worker) -> None:
    """`tasks.deliver_webhooks` sends its deliveries side by side; the one that failed is retried alone."""
    secret = make_secret()
    with Receiver(secret, default=Reply(200, delay_s=0.6)) as receiver:
        ids = [seed(sessions, receiver.url, secret) for _ in range(4)]
        receiver.respond(Reply(503, delay_s=0.6))
        started = time.monotonic()
        sender.send_task("tasks.deliver_webhooks", args=[ids], queue="webhooks")
        first_round = receiver.wait_for(4, timeout_s=10)
        elapsed = time.monotonic() - started
        outcomes = [wait_until(sessions, i, finished(DeliveryStatus.SUCCEEDED)) for i in ids]
        ledger = receiver.ledger
    # Four sends of 0.6 s each, one after another, would take 2.4 s.
    assert elapsed < 2.0
    assert sorted(r.status for r in first_round) == [200, 200, 200, 503]
    assert len(ledger) == 5, [(r.webhook_id[-6:], r.status, round(r.at, 2)) for r in ledger]
    assert sorted(len(attempts) for _, attempts in outcomes) == [1, 1, 1, 2]
    assert all(r.verified for r in ledger)


def test_slow_send_outlives_its_task_and_records_itself(sessions: sessionmaker[Session],
                                                         enqueue: Callable[[str], None]) -> None:
    """A send slower than the soft time limit is not cut short: it finishes on its thread and records a success."""
    secret = make_secret()
    with Receiver(secret, script=[Reply(200, delay_s=1.5)]) as receiver:
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        _, attempts = wait_until(sessions, delivery_id, finished(DeliveryStatus.SUCCEEDED))
        time.sleep(0.5)
        assert len(receiver.ledger) == 1
    assert [(a.status_code, a.error) for a in attempts] == [(200, None)]


def test_receiver_slower_than_the_timeout_is_a_timed_out_attempt(sessions: sessionmaker[Session],
                                                                  enqueue: Callable[[str], None]) -> None:
    """An endpoint that answers after the request timeout (5 s here) costs a failed attempt, then a retry."""
    secret = make_secret()
    with Receiver(secret, script=[Reply(200, delay_s=6)]) as receiver:
        delivery_id = seed(sessions, receiver.url, secret)
        enqueue(delivery_id)
        _, attempts = wait_until(sessions, delivery_id, finished(DeliveryStatus.SUCCEEDED), timeout_s=20)
    assert [a.status_code for a in attempts] == [None, 200]
    assert attempts[0].error.startswith("ReadTimeout") and 4900 <= attempts[0].duration_ms < 6000


def test_connection_refused_is_a_failed_attempt(sessions: sessionmaker[Session],
                                                enqueue: Callable[[str], None]) -> None:
    """A target with nothing listening gives a failed attempt with the connection error, scheduled for retry."""
    delivery_id = seed(sessions, f"http://127.0.0.1:{free_port()}/hook", make_secret())
    enqueue(delivery_id)
    delivery, attempts = wait_until(sessions, delivery_id, attempts_at_least(1))
    stop_retrying(sessions, delivery_id)
    assert attempts[0].status_code is None and attempts[0].error.startswith("ConnectError")
    assert delivery.status == "retrying"


def test_unresolvable_host_is_a_failed_attempt_not_a_refusal(sessions: sessionmaker[Session],
                                                             enqueue: Callable[[str], None]) -> None:
    """A host name that does not resolve (maybe a passing DNS failure) is retried, not marked dead."""
    delivery_id = seed(sessions, "http://hookgate-test.invalid/hook", make_secret())
    enqueue(delivery_id)
    delivery, attempts = wait_until(sessions, delivery_id, attempts_at_least(1))
    stop_retrying(sessions, delivery_id)
    assert "does not resolve" in (attempts[0].error or "")
    assert delivery.status == "retrying"


def test_private_target_is_refused_without_a_request(sessions: sessionmaker[Session], module_settings: Settings,
                                                     sender: Celery, tmp_path: Path) -> None:
    """With allow_private_targets=False a loopback URL ends dead with the SSRF reason and is never called."""
    strict = module_settings.model_copy(update={"allow_private_targets": False})
    secret = make_secret()
    # A queue of its own, so the module's permissive worker cannot take the task.
    with Receiver(secret) as receiver, Worker(strict, tmp_path / "strict-worker.log", queues=["webhooks-strict"]):
        delivery_id = seed(sessions, receiver.url, secret)
        sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks-strict")
        delivery, attempts = wait_until(sessions, delivery_id, finished(DeliveryStatus.DEAD))
        assert receiver.ledger == []
    assert "non-public address" in (delivery.last_error or "")
    assert [(a.status_code, a.error) for a in attempts] == [(None, delivery.last_error)]


# -- the store's side of the protocol ------------------------------------------------------------------


@pytest.fixture
def store(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(store_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _record(status_code: int | None = None, error: str | None = None) -> AttemptRecord:
    return AttemptRecord(started_at=utcnow(), duration_ms=1.0, status_code=status_code, error=error)


def test_claim_hands_out_one_lease(store: sessionmaker[Session]) -> None:
    """Of many concurrent claims of one delivery exactly one gets the job; the rest see the lease."""
    delivery_id = seed(store, "http://127.0.0.1:9/hook", make_secret())
    with ThreadPoolExecutor(8) as pool:
        jobs = [job for job in pool.map(lambda _: deliveries.claim(store, delivery_id, 60), range(8)) if job]
    assert len(jobs) == 1
    assert (jobs[0].attempt, jobs[0].event_type) == (1, "order.created")
    # The payload's fallback timestamp must carry its zone on both engines.
    assert jobs[0].event_received_at.utcoffset() == timedelta(0)
    assert deliveries.skip_reason(store, delivery_id) is SkipReason.LEASED


def test_claim_returns_after_the_lease_expires(store: sessionmaker[Session]) -> None:
    """A lease left by a dead worker is taken again once it expires, with the next attempt number."""
    delivery_id = seed(store, "http://127.0.0.1:9/hook", make_secret())
    assert deliveries.claim(store, delivery_id, lease_s=-1) is not None
    job = deliveries.claim(store, delivery_id, lease_s=60)
    assert job is not None and job.attempt == 2


def test_retrying_delivery_is_not_claimed_before_it_is_due(store: sessionmaker[Session]) -> None:
    """After a failed attempt with next_attempt_at in a minute, an early task gets nothing."""
    delivery_id = seed(store, "http://127.0.0.1:9/hook", make_secret())
    job = deliveries.claim(store, delivery_id, 60)
    assert job is not None
    assert deliveries.record_attempt(store, job, _record(503, "HTTP 503"), DeliveryStatus.RETRYING,
                                     next_attempt_at=utcnow() + timedelta(minutes=1))
    assert deliveries.claim(store, delivery_id, 60) is None
    assert deliveries.skip_reason(store, delivery_id) is SkipReason.NOT_DUE
    delivery, attempts = load(store, delivery_id)
    assert (delivery.status, delivery.last_error, delivery.lease_until) == ("retrying", "HTTP 503", None)
    assert [(a.number, a.status_code) for a in attempts] == [(1, 503)]


def test_stale_attempt_does_not_overwrite_a_newer_claim(store: sessionmaker[Session]) -> None:
    """An attempt whose lease expired and was re-claimed is recorded but leaves the status to the new holder."""
    delivery_id = seed(store, "http://127.0.0.1:9/hook", make_secret())
    stale = deliveries.claim(store, delivery_id, lease_s=-1)
    current = deliveries.claim(store, delivery_id, lease_s=60)
    assert stale is not None and current is not None
    assert not deliveries.record_attempt(store, stale, _record(200), DeliveryStatus.SUCCEEDED)
    assert deliveries.record_attempt(store, current, _record(500, "HTTP 500"), DeliveryStatus.DEAD)
    delivery, attempts = load(store, delivery_id)
    assert delivery.status == "dead"
    assert [a.number for a in attempts] == [1, 2]


def test_disabled_and_deleted_subscriptions_are_not_claimed(store: sessionmaker[Session]) -> None:
    """A disabled subscription's delivery waits untouched; a deleted one's can be cancelled."""
    paused = seed(store, "http://127.0.0.1:9/hook", make_secret(), enabled=False)
    assert deliveries.claim(store, paused, 60) is None
    assert deliveries.skip_reason(store, paused) is SkipReason.SUBSCRIPTION_DISABLED
    gone = seed(store, "http://127.0.0.1:9/hook", make_secret())
    with store.begin() as session:
        delivery = session.get(Delivery, gone)
        assert delivery is not None
        session.execute(update(Subscription).where(Subscription.id == delivery.subscription_id)
                        .values(deleted_at=utcnow()))
    assert deliveries.claim(store, gone, 60) is None
    assert deliveries.skip_reason(store, gone) is SkipReason.SUBSCRIPTION_DELETED
    assert deliveries.cancel(store, gone, "subscription deleted")
    assert load(store, gone)[0].status == "cancelled"
    assert load(store, paused)[0].attempts_count == 0


def test_unknown_delivery_is_not_claimed(store: sessionmaker[Session]) -> None:
    """An id that is not in the store gives no job and the reason 'unknown'."""
    assert deliveries.claim(store, new_id(), 60) is None
    assert deliveries.skip_reason(store, new_id()) is SkipReason.UNKNOWN


# -- pure parts ------------------------------------------------------------------------------------------


def _job(body: dict[str, Any]) -> DeliveryJob:
    return DeliveryJob(delivery_id="d", attempt=1, event_id="e", event_type="order.created",
                       event_received_at=utcnow(), event_body=orjson.dumps(body).decode(), subscription_id="s",
                       url="http://x", secret=make_secret(), previous_secret=None, previous_secret_expires_at=None,
                       payload_format="standard-webhooks", retry_schedule=None, schedule_attempt=1)


def test_webhook_body_uses_event_time_or_receipt_time() -> None:
    """The payload's timestamp is the event's time when it has one, else when hookgate received it."""
    with_time = _job({"id": "e", "type": "order.created", "time": "2024-05-01T10:00:00+02:00", "data": [1]})
    assert orjson.loads(webhook_body(with_time)) == {"type": "order.created", "timestamp": "2024-05-01T10:00:00+02:00",
                                                     "data": [1]}
    without = _job({"id": "e", "type": "order.created", "data_base64": "AAE="})
    payload = orjson.loads(webhook_body(without))
    assert payload["timestamp"] == without.event_received_at.isoformat()
    assert payload["data"] is None and payload["data_base64"] == "AAE="


# -- the test helpers others rely on ----------------------------------------------------------------------


def test_receiver_scripts_replies_and_flags_bad_signatures() -> None:
    """The receiver answers its script then the default, and marks a request signed with another secret unverified."""
    secret = make_secret()
    with (
        Receiver(secret, script=[503, Reply(302, headers={"location": "/elsewhere"})]) as receiver,
        httpx.Client() as client,
    ):
        statuses = []
        for signing_secret in (secret, secret, secret, make_secret()):
            timestamp = int(time.time())
            headers = {"webhook-id": "msg-1", "webhook-timestamp": str(timestamp),
                       "webhook-signature": sign([signing_secret], "msg-1", timestamp, b"{}")}
            statuses.append(client.post(receiver.url, content=b"{}", headers=headers).status_code)
        ledger = receiver.wait_for(4)
    assert statuses == [503, 302, 200, 200]
    assert [r.verified for r in ledger] == [True, True, True, False]
    assert "No matching signature" in (ledger[3].error or "")


def test_settings_env_reproduces_the_settings(monkeypatch: pytest.MonkeyPatch, module_settings: Settings) -> None:
    """The environment a Worker gets makes Settings() in that process equal to the test's settings."""
    for name, value in settings_env(module_settings).items():
        monkeypatch.setenv(name, value)
    assert Settings() == module_settings
