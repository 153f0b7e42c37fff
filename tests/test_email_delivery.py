"""Email delivery through a real worker on the email queue, real RabbitMQ, a real aiosmtpd server, both stores."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from consumers.celery_app import make_celery
from consumers.store.database import make_engine, make_sessionmaker
from schemas.settings import Settings
from tests.channel_seeding import add_channel_subscription, add_event_delivery, email_fields, load, wait_status
from tests.smtpserver import SmtpSink
from tests.workers import Worker

FAST = {"retry_schedule": (0, 1, 1), "smtp_timeout_s": 5.0, "task_soft_time_limit_s": 8, "task_time_limit_s": 10}


@pytest.fixture(scope="module")
def smtp(module_store_url: str) -> Iterator[SmtpSink]:
    """A server per store: each store's run counts its own messages."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def sessions(module_store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(module_store_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def settings(broker_url: str, module_store_url: str, smtp: SmtpSink) -> Settings:
    return Settings(broker_url=broker_url, database_url=module_store_url, smtp_host="127.0.0.1", smtp_port=smtp.port,
                    **FAST)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with Worker(settings, tmp_path_factory.mktemp("worker") / "worker.log", queues=["email"]) as running:
        yield running


@pytest.fixture(scope="module")
def sender(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def enqueue(sender: Celery, worker: Worker, request: pytest.FixtureRequest) -> Iterator[Callable[[str], None]]:
    """Send ``tasks.send_email`` for a delivery id; the worker's log is shown if the test fails."""
    failed_before = request.session.testsfailed
    yield lambda delivery_id: sender.send_task("tasks.send_email", args=[delivery_id], queue="email")
    if request.session.testsfailed > failed_before:
        terminal = request.config.pluginmanager.get_plugin("terminalreporter")
        terminal.write_line(f"--- worker log {worker.log_path} (tail) ---\n{worker.log_text()[-20000:]}")


def _customer(address: str | list[str], name: str = "Ada") -> dict[str, object]:
    return {"order_id": 1042, "customer": {"email": address, "name": name}}


def _sent_to(smtp: SmtpSink, address: str, at_least: int = 1) -> int:
    deadline = time.monotonic() + 20
    while len(smtp.messages_to(address)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(smtp.messages_to(address))


def test_one_email_per_recipient_rendered_with_text_and_html(
        sessions: sessionmaker[Session], enqueue: Callable[[str], None], smtp: SmtpSink) -> None:
    """Each recipient the pointer names gets the email once: rendered subject, text and autoescaped HTML parts,
    a Message-ID made from the delivery id, and the SMTP reply recorded as the attempt."""
    subscription_id = add_channel_subscription(sessions, email_fields())
    recipients = ["ada@example.com", "bob@example.org"]
    event, delivery_id = add_event_delivery(sessions, subscription_id, _customer(recipients, "<Ada & Co>"))
    enqueue(delivery_id)
    delivery, attempts = wait_status(sessions, delivery_id, "succeeded")

    assert [_sent_to(smtp, address) for address in recipients] == [1, 1]
    (message,) = smtp.messages_to("ada@example.com")
    assert message["Subject"] == "Order 1042 paid"
    assert message["From"] == "shop@example.com"
    assert message["Reply-To"] == "help@example.com"
    assert message["To"] == "ada@example.com, bob@example.org"
    assert message["Message-ID"] == f"<{delivery_id}@example.com>"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().strip() == f"Hello <Ada & Co>, order 1042 (order.paid, {event.id}) is paid."
    assert html.get_content().strip() == "<p>Hello <b>&lt;Ada &amp; Co&gt;</b>, order 1042 is paid.</p>"
    assert [(a.number, a.status_code) for a in attempts] == [(1, 250)]
    assert attempts[0].response_body is not None and "Ok: queued" in attempts[0].response_body
    assert delivery.lease_until is None and delivery.last_error is None


def test_a_delivery_enqueued_twice_is_sent_once(
        sessions: sessionmaker[Session], enqueue: Callable[[str], None], smtp: SmtpSink) -> None:
    """Two tasks for the same delivery, taken by two pool processes at once, send one email and record one attempt."""
    subscription_id = add_channel_subscription(sessions, email_fields(to=["twice@example.com"]))
    _, delivery_id = add_event_delivery(sessions, subscription_id, _customer("unused@example.com"))
    enqueue(delivery_id)
    enqueue(delivery_id)
    wait_status(sessions, delivery_id, "succeeded")
    time.sleep(1.0)  # the second task, had it sent, would have done so by now

    assert _sent_to(smtp, "twice@example.com") == 1
    assert [a.number for a in load(sessions, delivery_id)[1]] == [1]


def test_a_451_reply_is_retried_and_later_succeeds(
        sessions: sessionmaker[Session], enqueue: Callable[[str], None], smtp: SmtpSink) -> None:
    """A transient 451 is recorded as a failed attempt with its reply, retried on the schedule, and then sent."""
    subscription_id = add_channel_subscription(sessions, email_fields(to=["later@example.com"]))
    _, delivery_id = add_event_delivery(sessions, subscription_id, _customer("unused@example.com"))
    smtp.script("451 4.3.0 Mailbox busy, try again later")
    enqueue(delivery_id)
    _, attempts = wait_status(sessions, delivery_id, "succeeded")

    assert [(a.number, a.status_code) for a in attempts] == [(1, 451), (2, 250)]
    assert attempts[0].error is not None and "451 4.3.0 Mailbox busy" in attempts[0].error
    assert _sent_to(smtp, "later@example.com") == 1


def test_a_550_reply_is_dead_at_once(
        sessions: sessionmaker[Session], enqueue: Callable[[str], None], smtp: SmtpSink) -> None:
    """A permanent 550 ends the delivery dead after one attempt, with the reply as its reason."""
    subscription_id = add_channel_subscription(sessions, email_fields(to=["nobody@example.com"]))
    _, delivery_id = add_event_delivery(sessions, subscription_id, _customer("unused@example.com"))
    smtp.script("550 5.1.1 No such user here")
    enqueue(delivery_id)
    delivery, attempts = wait_status(sessions, delivery_id, "dead")

    assert [(a.number, a.status_code) for a in attempts] == [(1, 550)]
    assert delivery.last_error is not None and "550 5.1.1 No such user here" in delivery.last_error
    assert delivery.next_attempt_at is None
    assert smtp.messages_to("nobody@example.com") == []


@pytest.mark.parametrize(
    ("fields", "data", "reason"),
    [
        ({}, {"order_id": 7, "customer": {"name": "no address"}}, "the event has no recipient at /data/customer/email"),
        ({}, _customer("not-an-address"), "is not an email address"),
        ({"template": {"subject": "{{ data.missing.deeper }}", "text": "t"}}, _customer("tpl@example.com"),
         "the subject template failed: UndefinedError"),
        ({"template": {"subject": "s", "text": "{{ 1 / data.order_id_zero }}"}}, {**_customer("z@example.com"),
                                                                                 "order_id_zero": 0},
         "the text template failed"),
    ],
    ids=["missing-recipient", "bad-address", "undefined-in-template", "error-in-template"],
)
def test_a_delivery_that_cannot_become_an_email_is_dead_with_its_reason(
        sessions: sessionmaker[Session], enqueue: Callable[[str], None], smtp: SmtpSink,
        fields: dict[str, object], data: dict[str, object], reason: str) -> None:
    """A missing recipient field, an address that does not parse or a template that fails on the event ends the
    delivery dead at once, with the reason, and nothing reaches the SMTP server."""
    commands_before = smtp.data_commands
    subscription_id = add_channel_subscription(sessions, email_fields(**fields))
    _, delivery_id = add_event_delivery(sessions, subscription_id, data)
    enqueue(delivery_id)
    delivery, attempts = wait_status(sessions, delivery_id, "dead")

    assert delivery.last_error is not None and reason in delivery.last_error
    assert [(a.number, a.status_code) for a in attempts] == [(1, None)]
    assert smtp.data_commands == commands_before


def test_a_finished_delivery_is_never_sent_again(
        sessions: sessionmaker[Session], enqueue: Callable[[str], None], smtp: SmtpSink) -> None:
    """A task for a delivery that already succeeded sends nothing and records nothing (check, send, mark sent)."""
    subscription_id = add_channel_subscription(sessions, email_fields(to=["once@example.com"]))
    _, delivery_id = add_event_delivery(sessions, subscription_id, _customer("unused@example.com"))
    enqueue(delivery_id)
    wait_status(sessions, delivery_id, "succeeded")
    enqueue(delivery_id)
    # A marker delivery enqueued after it: once it is sent, the worker has taken the repeat too.
    marker_id = add_event_delivery(sessions, add_channel_subscription(sessions, email_fields(to=["m@example.com"])),
                                   _customer("unused@example.com"))[1]
    enqueue(marker_id)
    wait_status(sessions, marker_id, "succeeded")
    time.sleep(0.5)

    assert _sent_to(smtp, "once@example.com") == 1
    assert len(load(sessions, delivery_id)[1]) == 1

