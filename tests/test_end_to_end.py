"""End to end through real processes: `hookgate serve`, `hookgate router`, a Celery worker, real receivers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent as LibCloudEvent
from kombu import Connection
from sqlalchemy import inspect, text

from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.keys import create_api_key
from consumers.topology import declare_topology
from schemas import topology
from schemas.keys import Scope
from schemas.settings import Settings
from tests.receiver import Receiver, make_secret
from tests.workers import REPO_ROOT, Worker, settings_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """hookgate's processes started as an operator starts them, with their logs kept for failures."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            child = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], cwd=REPO_ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append((name, child))
        return child

    def stop(self) -> None:
        for _, child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for _, child in self.children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()

    def dump_logs(self) -> None:
        for name, _ in self.children:
            print(f"--- {name} ---\n{(self.logs / f'{name}.log').read_text(errors='replace')[-4000:]}")


@pytest.fixture
def stack(make_settings: Callable[..., Settings], store_url: str,
          tmp_path: Path) -> Iterator[tuple[Processes, str, str]]:
    """Gateway, router and webhook worker on this module's vhost and a fresh store; yields (procs, url, key)."""
    port = _free_port()
    settings = make_settings(database_url=store_url, port=port, router_batch_wait_s=0.01,
                             retry_schedule=(0, 1, 2, 4, 8, 16, 32, 64))
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        for queue in (topology.INGEST_QUEUE, topology.WEBHOOKS_QUEUE):
            conn.default_channel.queue_purge(queue)
    engine = make_engine(store_url)
    _, key = create_api_key(make_sessionmaker(engine), "e2e", [Scope.ADMIN])
    engine.dispose()
    procs = Processes(settings, tmp_path)
    procs.start("serve", "serve", "--port", str(port))
    procs.start("router", "router")
    worker = Worker(settings, tmp_path / "worker.log")
    base = f"http://127.0.0.1:{port}"
    try:
        worker.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the gateway did not get ready"
            time.sleep(0.1)
        yield procs, base, key
    except BaseException:
        procs.dump_logs()
        raise
    finally:
        worker.stop()
        procs.stop()


def _subscribe(base: str, key: str, url: str, secret: str, event_types: list[str]) -> str:
    response = httpx.post(f"{base}/v1/subscriptions", headers={"Authorization": f"Bearer {key}"},
                          json={"url": url, "secret": secret, "event_types": event_types})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_every_way_in_reaches_every_matching_receiver_once(stack: tuple[Processes, str, str]) -> None:
    """HTTP plain, structured, binary and batch, and a raw AMQP publish, each arrive signed, once per subscription."""
    procs, base, key = stack
    auth = {"Authorization": f"Bearer {key}"}
    orders_secret, all_secret = make_secret(), make_secret()
    with Receiver(orders_secret) as orders, Receiver(all_secret) as everything:
        _subscribe(base, key, orders.url, orders_secret, ["order.*"])
        _subscribe(base, key, everything.url, all_secret, ["#"])
        time.sleep(procs.settings.subscription_cache_ttl_s + 0.2)

        sent: list[str] = []
        r = httpx.post(f"{base}/v1/events", headers=auth, json={"type": "order.paid", "source": "shop",
                                                                "data": {"way": "plain"}})
        sent.append(r.json()["id"])
        lib_event = LibCloudEvent({"id": "ce-struct", "source": "/shop", "type": "order.shipped",
                                   "datacontenttype": "application/json"}, {"way": "structured"})
        for encode, event_id in ((ce_http.to_structured_event, "ce-struct"), (ce_http.to_binary_event, "ce-bin")):
            lib_event = LibCloudEvent({**lib_event.get_attributes(), "id": event_id},
                                      {"way": encode.__name__})
            message = encode(lib_event)
            r = httpx.post(f"{base}/v1/events", headers={**auth, **message.headers}, content=message.body)
            assert r.status_code == 202, r.text
            sent.append(event_id)
        r = httpx.post(f"{base}/v1/events/batch", headers=auth,
                       json=[{"type": "order.refunded", "source": "shop", "data": {"way": "batch"}},
                             {"type": "user.created", "source": "crm", "data": {"way": "batch"}}])
        assert r.status_code == 202, r.text
        sent.extend(r.json()["ids"])
        with Connection(procs.settings.broker_url, transport_options={"confirm_publish": True}) as conn:
            conn.Producer().publish(orjson.dumps({"type": "order.amqp", "source": "erp", "data": {"way": "amqp"}}),
                                    exchange=topology.EVENTS_EXCHANGE, routing_key="order.amqp",
                                    content_type="application/json", message_id="amqp-1", delivery_mode=2)
        sent.append("amqp-1")

        got_all = everything.wait_for(6, timeout_s=30)
        got_orders = orders.wait_for(5, timeout_s=30)
        time.sleep(1.0)  # anything extra would show up now
        assert len(everything.ledger) == 6 and len(orders.ledger) == 5
    for received in got_all + got_orders:
        assert received.verified, received.error
    assert {r.json()["type"] for r in got_orders} == {"order.paid", "order.shipped", "order.refunded", "order.amqp"}
    assert {r.json()["data"]["way"] for r in got_all} >= {"plain", "batch", "amqp"}
    assert len({r.webhook_id for r in got_all + got_orders}) == 11

    # The event, its delivery and the attempt are on record.
    event = httpx.get(f"{base}/v1/events/{sent[0]}", headers=auth).json()
    assert {d["status"] for d in event["deliveries"]} == {"succeeded"}
    assert len(event["deliveries"]) == 2
    assert all(d["attempts"][0]["status_code"] == 200 for d in event["deliveries"])
    # ...and only there: delivery tasks leave no Celery result behind (a second write per task).
    engine = make_engine(procs.settings.database_url)
    try:
        with engine.connect() as conn:
            if inspect(conn).has_table("celery_taskmeta"):
                assert conn.execute(text("SELECT count(*) FROM celery_taskmeta")).scalar_one() == 0
    finally:
        engine.dispose()


def test_idempotency_key_retries_deliver_once(stack: tuple[Processes, str, str]) -> None:
    """A client that retries with the same Idempotency-Key gets its event delivered exactly once."""
    procs, base, key = stack
    secret = make_secret()
    with Receiver(secret) as receiver:
        _subscribe(base, key, receiver.url, secret, ["invoice.#"])
        time.sleep(procs.settings.subscription_cache_ttl_s + 0.2)
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "invoice-9-issued"}
        for _ in range(3):
            r = httpx.post(f"{base}/v1/events", headers=headers, json={"type": "invoice.issued", "source": "billing"})
            assert r.status_code == 202
        receiver.wait_for(1, timeout_s=30)
        time.sleep(1.5)
        assert len(receiver.ledger) == 1


def test_celery_inspect_sees_the_worker(stack: tuple[Processes, str, str]) -> None:
    """`celery -A consumers.celery_app:celery_app inspect active` answers for hookgate's worker."""
    procs, _, _ = stack
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "consumers.celery_app:celery_app", "inspect", "active", "-t", "5"],
        cwd=REPO_ROOT, env=procs.env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "@" in result.stdout and "OK" in result.stdout, result.stdout
