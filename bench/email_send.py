"""Email throughput: the SMTP client alone, then deliveries through a real `hookgate worker -Q email`.

    .venv/bin/python -m bench.email_send [--messages 300] [--concurrency 2]

Both send to an aiosmtpd server on loopback in this process (it accepts at once). "client": one
thread submits messages one after another with consumers.smtp.Mailer (a new SMTP connection per
message, as the email task does), timed on the wall clock and on the sending thread's own CPU.
"worker": that many email deliveries pending in a SQLite store, their `tasks.send_email` published
at once, a worker process draining them; the rate runs from the first attempt's start to the last
one's end, as recorded in the store.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from sqlalchemy import func, select

from bench.run import free_port, process, rabbitmqctl
from consumers.celery_app import make_celery
from consumers.smtp import Mailer, SmtpServer
from consumers.store.database import make_engine, make_sessionmaker, migrate, utcnow
from consumers.store.models import Attempt, Delivery, Event, Subscription
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.settings import Settings
from schemas.subscriptions import SubscriptionCreate


class _Count:
    def __init__(self) -> None:
        self.accepted = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.accepted += 1
        return "250 2.0.0 Ok"


def _message(n: int) -> EmailMessage:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "shop@example.com", "ada@example.com", f"Order {n}"
    message.set_content("Your order is paid. " * 20)
    return message


def client(port: int, messages: int) -> None:
    mailer = Mailer(SmtpServer("127.0.0.1", port, "none", 10.0))
    wall, cpu = time.perf_counter(), time.thread_time()
    for n in range(messages):
        mailer.send(_message(n))
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    print(f"client: {messages / wall:,.0f} messages/s, {cpu / messages * 1e6:,.0f} µs CPU per send "
          f"(sending thread), {wall / messages * 1000:.2f} ms wall per send")


def worker(port: int, messages: int, concurrency: int, work: Path) -> None:
    vhost = f"hookgate-bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        store = f"sqlite:///{work / 'bench.db'}"
        migrate(store)
        settings = Settings(broker_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}", database_url=store,
                            smtp_host="127.0.0.1", smtp_port=port, log_level="WARNING")  # type: ignore[arg-type]
        engine = make_engine(store)
        sessions = make_sessionmaker(engine)
        ids = _seed(sessions, messages)
        env = {**os.environ, "HOOKGATE_BROKER_URL": settings.broker_url, "HOOKGATE_DATABASE_URL": store,
               "HOOKGATE_SMTP_HOST": "127.0.0.1", "HOOKGATE_SMTP_PORT": str(port), "HOOKGATE_LOG_LEVEL": "WARNING"}
        sender = make_celery(settings)
        with process([sys.executable, "-m", "gateway.cli", "worker", "-Q", "email", "-c", str(concurrency)], env,
                     work / "worker.log"):
            time.sleep(4)  # the worker's start; the clock below runs on the store's own times
            for delivery_id in ids:
                sender.send_task("tasks.send_email", args=[delivery_id], queue="email")
            deadline = time.monotonic() + 300
            while _succeeded(sessions) < messages and time.monotonic() < deadline:
                time.sleep(0.2)
        sender.close()
        with sessions() as session:
            first, last, mean_ms = session.execute(select(func.min(Attempt.started_at), func.max(Attempt.started_at),
                                                          func.avg(Attempt.duration_ms))).one()
        done = _succeeded(sessions)
        engine.dispose()
        span = (last - first).total_seconds()
        print(f"worker -c {concurrency}: {done} of {messages} sent, {done / span:,.0f} emails/s "
              f"(first to last attempt {span:.1f} s), mean attempt {mean_ms:.1f} ms")
    finally:
        rabbitmqctl("delete_vhost", vhost)


def _seed(sessions: Any, messages: int) -> list[str]:
    options = SubscriptionCreate.model_validate({
        "channel": "email", "event_types": ["order.*"], "to": "/data/email", "from": "shop@example.com",
        "template": {"subject": "Order {{ data.n }} paid", "text": "Hello, order {{ data.n }} is paid.",
                     "html": "<p>Order <b>{{ data.n }}</b> is paid.</p>"}}).options
    now, subscription_id, ids = utcnow(), new_id(), []
    with sessions.begin() as session:
        session.add(Subscription(id=subscription_id, channel="email", event_types=["order.*"], url=None, secret=None,
                                 description="", enabled=True, options=options, created_at=now, updated_at=now))
        for n in range(messages):
            event = CloudEvent(id=new_id(), source="bench", type="order.paid", data={"n": n, "email": "a@example.com"})
            pk, delivery_id = new_id(), new_id()
            session.add(Event(pk=pk, id=event.id, source=event.source, type=event.type, body=event.to_json().decode(),
                              received_at=now))
            session.flush()
            session.add(Delivery(id=delivery_id, event_pk=pk, subscription_id=subscription_id, status="pending",
                                 attempts_count=0, created_at=now, updated_at=now))
            ids.append(delivery_id)
    return ids


def _succeeded(sessions: Any) -> int:
    with sessions() as session:
        return int(session.execute(select(func.count()).select_from(Delivery)
                                   .where(Delivery.status == "succeeded")).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    counter = _Count()
    controller = Controller(counter, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        client(port, args.messages)
        with tempfile.TemporaryDirectory() as work:
            worker(port, args.messages, args.concurrency, Path(work))
    finally:
        controller.stop()
    print(f"server accepted {counter.accepted} messages in all")


if __name__ == "__main__":
    main()
