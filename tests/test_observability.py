"""Observability: request ids on every response and in log lines, and Prometheus metrics that move."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import structlog
from kombu import Connection
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.celery_app import make_celery
from consumers.logs import structlog_formatter
from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.models import Delivery, Event
from consumers.topology import declare_topology
from gateway.middleware import RequestId
from gateway.problems import exception_handlers
from schemas import topology
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, assert_problem, connected_gateway, running_gateway
from tests.receiver import Receiver, make_secret
from tests.test_router import RouterHarness, _add_subscription
from tests.test_webhook_delivery import seed
from tests.workers import REPO_ROOT, Worker, settings_env

_EVENT = {"type": "order.paid", "source": "shop", "data": {"n": 1}}


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], sqlite_url: str) -> AsyncIterator[Gateway]:
    async with connected_gateway(make_settings(database_url=sqlite_url, max_body_bytes=1024)) as gw:
        yield gw


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every log line of this test, rendered as JSON by the processor chain every hookgate process uses."""
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_level = root.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog_formatter("gateway", json=True))
    # Loggers cached under this configuration would keep it after the test.
    structlog.configure(cache_logger_on_first_use=False)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _metrics(gateway: Gateway, headers: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await gateway.client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


def _accepted(outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("hookgate_events_accepted_total", (("outcome", outcome),))


async def test_a_given_request_id_is_echoed(gateway: Gateway) -> None:
    """A client's X-Request-ID comes back unchanged on the response."""
    response = await gateway.client.get("/healthz", headers={"X-Request-ID": "client-chosen id 42"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "client-chosen id 42"


async def test_a_request_id_is_generated_when_absent_or_unfit(gateway: Gateway) -> None:
    """Without a usable X-Request-ID (none, too long, control characters) each response gets a fresh one."""
    ids = set()
    for headers in ({}, {"X-Request-ID": "x" * 201}, {"X-Request-ID": "a\tb"}):
        response = await gateway.client.get("/healthz", headers=headers)
        ids.add(response.headers["x-request-id"])
    assert len(ids) == 3 and all(len(i) == 36 for i in ids)


async def test_problem_responses_carry_the_request_id(gateway: Gateway) -> None:
    """401, 404 and both kinds of 413 (declared and chunked) are problems that carry the request id."""
    unauthorized = await gateway.client.post("/v1/events", json=_EVENT, headers={"X-Request-ID": "r-401"})
    assert_problem(unauthorized, 401)
    assert unauthorized.headers["x-request-id"] == "r-401"
    missing = await gateway.client.get("/nowhere", headers={"X-Request-ID": "r-404"})
    assert_problem(missing, 404)
    assert missing.headers["x-request-id"] == "r-404"
    auth = gateway.auth(Scope.EVENTS_WRITE)
    declared = await gateway.client.post("/v1/events", content=b"x" * 2048,
                                         headers={**auth, "X-Request-ID": "r-413", "Content-Type": "application/json"})
    assert_problem(declared, 413)
    assert declared.headers["x-request-id"] == "r-413"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 512

    chunked = await gateway.client.post("/v1/events", content=chunks(),
                                        headers={**auth, "X-Request-ID": "r-413c", "Content-Type": "application/json"})
    assert_problem(chunked, 413)
    assert chunked.headers["x-request-id"] == "r-413c"


async def test_log_lines_during_a_request_carry_its_id(gateway: Gateway, log_lines: io.StringIO) -> None:
    """A line logged while serving a request (a scope refused) carries that request's id, and later lines do not."""
    response = await gateway.client.get("/metrics", headers={**gateway.auth(Scope.EVENTS_WRITE),
                                                             "X-Request-ID": "trace-me"})
    assert_problem(response, 403)
    logging.getLogger("after").info("outside any request")
    lines = [orjson.loads(line) for line in log_lines.getvalue().splitlines()]
    (denied,) = [line for line in lines if line["event"] == "scope_denied"]
    assert denied["request_id"] == "trace-me" and denied["process"] == "gateway"
    (after,) = [line for line in lines if line["event"] == "outside any request"]
    assert "request_id" not in after and "key_id" not in after


async def test_an_unhandled_error_answers_500_with_the_id_and_logs_it(log_lines: io.StringIO) -> None:
    """A route that raises gets a 500 problem with the request id, and the error's log line carries the id."""

    async def boom(_request: Request) -> Response:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/boom", boom)], middleware=[Middleware(RequestId)],
                    exception_handlers=exception_handlers())
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom", headers={"X-Request-ID": "r-500"})
    assert_problem(response, 500)
    assert response.headers["x-request-id"] == "r-500"
    lines = [orjson.loads(line) for line in log_lines.getvalue().splitlines()]
    (error,) = [line for line in lines if line["event"] == "unhandled_error"]
    assert error["request_id"] == "r-500"
    # The app ran in this test's context, and an error leaves the id bound for Starlette's handler.
    structlog.contextvars.clear_contextvars()


async def test_metrics_need_the_admin_scope(gateway: Gateway) -> None:
    """/metrics answers 401 without a key and 403 to a key without the admin scope."""
    assert_problem(await gateway.client.get("/metrics"), 401)
    assert_problem(await gateway.client.get("/metrics", headers=gateway.auth(Scope.EVENTS_WRITE)), 403)


async def test_metrics_can_be_public(make_settings: Callable[..., Settings], sqlite_url: str) -> None:
    """With metrics_public the gateway serves /metrics without a key."""
    async with running_gateway(make_settings(database_url=sqlite_url, metrics_public=True)) as gw:
        assert _accepted("accepted") in await _metrics(gw, {})


async def test_ingest_counters_and_confirm_histogram_move(gateway: Gateway) -> None:
    """Accepted events (a batch counts each), a rejected request and the confirm latency all show on /metrics."""
    admin = gateway.auth(Scope.ADMIN)
    before = await _metrics(gateway, admin)
    writer = gateway.auth(Scope.EVENTS_WRITE)
    assert (await gateway.client.post("/v1/events", json=_EVENT, headers=writer)).status_code == 202
    assert (await gateway.client.post("/v1/events/batch", json=[_EVENT, _EVENT], headers=writer)).status_code == 202
    assert_problem(await gateway.client.post("/v1/events", json={"source": "no type"}, headers=writer), 422)
    after = await _metrics(gateway, admin)
    assert after[_accepted("accepted")] - before[_accepted("accepted")] == 3
    assert after[_accepted("rejected")] - before[_accepted("rejected")] == 1
    count = ("hookgate_publish_confirm_seconds_count", ())
    assert after[count] - before[count] == 2
    assert after[("hookgate_publish_confirm_seconds_sum", ())] > before[("hookgate_publish_confirm_seconds_sum", ())]


async def test_metrics_show_every_queue_depth_as_the_broker_counts_it(gateway: Gateway) -> None:
    """``/metrics`` asks RabbitMQ at scrape time: events waiting in ``hookgate.ingest`` (no router here) are its
    ready messages, with no consumer, and every other hookgate queue has its series too."""
    admin, writer = gateway.auth(Scope.ADMIN), gateway.auth(Scope.EVENTS_WRITE)
    ingest = (("queue", topology.INGEST_QUEUE),)
    before = (await _metrics(gateway, admin))[("hookgate_queue_messages_ready", ingest)]
    for _ in range(3):
        assert (await gateway.client.post("/v1/events", json=_EVENT, headers=writer)).status_code == 202
    samples = await _metrics(gateway, admin)
    assert samples[("hookgate_queue_stats_up", ())] == 1
    assert samples[("hookgate_queue_messages_ready", ingest)] - before == 3
    assert samples[("hookgate_queue_consumers", ingest)] == 0
    for queue in (topology.WEBHOOKS_QUEUE, topology.EMAIL_QUEUE, topology.HEAVY_QUEUE, topology.DEAD_QUEUE):
        assert ("hookgate_queue_messages_ready", (("queue", queue),)) in samples


def _value(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_router_counts_routed_duplicate_and_dead_lettered(make_settings: Callable[..., Settings],
                                                                sqlite_url: str) -> None:
    """Two new events, one duplicate and one message that is not an event move the router's three counters."""
    settings = make_settings(database_url=sqlite_url, router_batch_wait_s=0.01)
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        for queue in (topology.INGEST_QUEUE, topology.DEAD_QUEUE, topology.WEBHOOKS_QUEUE):
            conn.default_channel.queue_purge(queue)
    names = ("hookgate_events_routed_total", "hookgate_events_duplicate_total", "hookgate_events_dead_lettered_total")
    before = [_value(name) for name in names]
    async with RouterHarness(settings) as router:
        _add_subscription(router.sessions, ["order.*"])
        for event_id in ("a", "b", "a"):
            router.publish(orjson.dumps({**_EVENT, "id": event_id}), "order.paid")
        router.publish(b"not json", "order.paid")
        await router.wait_for(lambda: router.count(Event) == 2 and router.count(Delivery) == 2)
        await router.wait_for(lambda: [_value(name) - b for name, b in zip(names, before, strict=True)] == [2, 1, 1])


async def test_router_log_lines_carry_the_event_and_message_ids(make_settings: Callable[..., Settings],
                                                                 sqlite_url: str, log_lines: io.StringIO) -> None:
    """The router writes one line per routed event with its event id and deliveries, and a dead-lettered
    message's line carries its message id."""
    settings = make_settings(database_url=sqlite_url, router_batch_wait_s=0.01)
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        for queue in (topology.INGEST_QUEUE, topology.DEAD_QUEUE, topology.WEBHOOKS_QUEUE):
            conn.default_channel.queue_purge(queue)
    async with RouterHarness(settings) as router:
        _add_subscription(router.sessions, ["order.*"])
        router.publish(orjson.dumps({**_EVENT, "id": "traced-1"}), "order.paid")
        router.publish(b"not json", "order.paid", message_id="garbage-1")
        await router.wait_for(lambda: router.count(Delivery) == 1 and '"event_dead_lettered"' in log_lines.getvalue())
        with router.sessions() as session:
            delivery_id = session.scalars(select(Delivery.id)).one()
    lines = [orjson.loads(line) for line in log_lines.getvalue().splitlines()]
    routed = [line for line in lines if line["event"] == "event_routed"]
    assert [(line["event_id"], line["delivery_ids"]) for line in routed] == [("traced-1", [delivery_id])]
    dead = [line for line in lines if line["event"] == "event_dead_lettered"]
    assert [line["message_id"] for line in dead] == ["garbage-1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_prefork_worker_metrics_aggregate_its_children(make_settings: Callable[..., Settings], sqlite_url: str,
                                                            tmp_path: Path) -> None:
    """A prefork worker serves on its own port what its children counted: a failed attempt, a retry, a success."""
    port = _free_port()
    settings = make_settings(database_url=sqlite_url, worker_metrics_port=port, retry_schedule=(0, 1, 1))
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    engine = make_engine(sqlite_url)
    secret = make_secret()
    expected = {
        ("hookgate_deliveries_total", (("channel", "webhook"), ("outcome", "retrying"))): 1.0,
        ("hookgate_deliveries_total", (("channel", "webhook"), ("outcome", "succeeded"))): 1.0,
        ("hookgate_retries_scheduled_total", (("channel", "webhook"),)): 1.0,
        ("hookgate_attempt_seconds_count", (("channel", "webhook"),)): 2.0,
    }
    with (
        Receiver(secret, script=[503]) as receiver,
        Worker(settings, tmp_path / "worker.log", extra_env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}),
    ):
        delivery_id = seed(make_sessionmaker(engine), receiver.url, secret)
        sender = make_celery(settings)
        sender.send_task("tasks.deliver_webhooks", args=[[delivery_id]], queue=topology.WEBHOOKS_QUEUE)
        receiver.wait_for(2)
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                samples = _samples((await client.get(f"http://127.0.0.1:{port}/metrics")).text)
                if all(samples.get(key) == value for key, value in expected.items()):
                    break
                await asyncio.sleep(0.1)
        sender.close()
    engine.dispose()
    assert {key: samples.get(key) for key in expected} == expected


def test_the_router_serves_its_metrics_on_its_port(make_settings: Callable[..., Settings], sqlite_url: str,
                                                   tmp_path: Path) -> None:
    """``hookgate router`` with a metrics port answers there with the router's counters."""
    port = _free_port()
    env = {**os.environ, **settings_env(make_settings(database_url=sqlite_url, router_metrics_port=port))}
    with (tmp_path / "router.log").open("wb") as log:
        router = subprocess.Popen([sys.executable, "-m", "gateway.cli", "router"], cwd=REPO_ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics")
                break
            except httpx.ConnectError:
                assert router.poll() is None, (tmp_path / "router.log").read_text()
                time.sleep(0.1)
        else:
            raise AssertionError(f"nothing answered on port {port}")
        assert ("hookgate_events_routed_total", ()) in _samples(response.text)
    finally:
        router.terminate()
        assert router.wait(15) == 0


def test_task_log_lines_carry_the_task_id(log_lines: io.StringIO) -> None:
    """A log line written inside a Celery task carries that task's id and name; one written after it does not."""
    app = make_celery(Settings())
    app.conf.task_always_eager = True
    log = structlog.get_logger("tests.task")

    @app.task(name="tests.log_something")
    def log_something() -> None:
        log.info("inside_task")

    result = log_something.apply()
    log.info("after_task")
    app.close()
    lines = {line["event"]: line for line in map(orjson.loads, log_lines.getvalue().splitlines())}
    assert lines["inside_task"]["task_id"] == result.id
    assert lines["inside_task"]["task"] == "tests.log_something"
    assert "task_id" not in lines["after_task"]
