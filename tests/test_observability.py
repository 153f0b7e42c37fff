"""Observability: request ids on every response and in log lines, and Prometheus metrics that move."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pty
import re
import select as fd_select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

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
from consumers.store.database import make_engine, make_sessionmaker, migrate, utcnow
from consumers.store.models import Delivery, Event
from consumers.topology import declare_topology
from gateway.middleware import RequestId
from gateway.problems import exception_handlers
from schemas import topology
from schemas.ids import new_id
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, assert_problem, connected_gateway, running_gateway
from tests.channel_stack import ChannelStack
from tests.receiver import Received, Receiver, Reply, make_secret
from tests.seeding import add_delivery, add_subscription
from tests.test_router import RouterHarness, _add_subscription
from tests.test_webhook_delivery import seed
from tests.vhosts import fresh_vhost
from tests.workers import REPO_ROOT, Hookgate, Worker, free_port, settings_env, wait_until

_EVENT = {"type": "order.paid", "source": "shop", "data": {"n": 1}}
_MANAGEMENT_URL = "http://127.0.0.1:15672"
_WEBHOOK = (("channel", "webhook"),)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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


def _samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _metrics(gateway: Gateway, headers: dict[str, str]) -> Samples:
    response = await gateway.client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


def _scrape(port: int) -> Samples:
    return _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)


def _scrape_until(port: int, check: Callable[[Samples], bool], what: str, timeout_s: float = 20.0) -> Samples:
    """Scrape the metrics port of a router or worker until ``check`` holds; return those samples."""
    scraped: list[Samples] = [{}]

    def holds() -> bool:
        scraped[0] = _scrape(port)
        return check(scraped[0])

    wait_until(holds, what, timeout_s=timeout_s, interval_s=0.1)
    return scraped[0]


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


def _empty_queues(settings: Settings) -> None:
    # The vhost is the module's: earlier tests leave events and tasks behind.
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        for queue in (topology.INGEST_QUEUE, topology.DEAD_QUEUE, topology.WEBHOOKS_QUEUE):
            conn.default_channel.queue_purge(queue)


async def test_router_counts_routed_duplicate_and_dead_lettered(make_settings: Callable[..., Settings],
                                                                sqlite_url: str) -> None:
    """Two new events, one duplicate and one message that is not an event move the router's three counters."""
    settings = make_settings(database_url=sqlite_url, router_batch_wait_s=0.01)
    _empty_queues(settings)
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
    """The router writes one line per routed event with its event and message ids and its deliveries, and a
    dead-lettered message's line carries its message id; the batch's own line carries neither, both unbound."""
    settings = make_settings(database_url=sqlite_url, router_batch_wait_s=0.01)
    _empty_queues(settings)
    async with RouterHarness(settings) as router:
        _add_subscription(router.sessions, ["order.*"])
        router.publish(orjson.dumps({**_EVENT, "id": "traced-1"}), "order.paid", message_id="message-1")
        router.publish(b"not json", "order.paid", message_id="garbage-1")
        await router.wait_for(lambda: router.count(Delivery) == 1 and '"event_dead_lettered"' in log_lines.getvalue())
        with router.sessions() as session:
            delivery_id = session.scalars(select(Delivery.id)).one()
    lines = [orjson.loads(line) for line in log_lines.getvalue().splitlines()]
    routed = [line for line in lines if line["event"] == "event_routed"]
    assert [(line["event_id"], line["message_id"], line["delivery_ids"]) for line in routed] == [
        ("traced-1", "message-1", [delivery_id])]
    dead = [line for line in lines if line["event"] == "event_dead_lettered"]
    assert [line["message_id"] for line in dead] == ["garbage-1"]
    batches = [line for line in lines if line["event"] == "batch_routed"]
    assert batches and not any("message_id" in line or "event_id" in line for line in batches)


def test_prefork_worker_metrics_aggregate_its_children(make_settings: Callable[..., Settings], sqlite_url: str,
                                                            tmp_path: Path) -> None:
    """A prefork worker serves on its own port what its children counted: a failed attempt, a retry, a success."""
    port = free_port()
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
        _scrape_until(port, lambda samples: all(samples.get(key) == value for key, value in expected.items()),
                      f"the worker's port to show {expected}")
        sender.close()
    engine.dispose()


def test_the_router_serves_its_metrics_on_its_port(make_settings: Callable[..., Settings], sqlite_url: str,
                                                   tmp_path: Path) -> None:
    """``hookgate router`` with a metrics port answers there with the router's counters."""
    port = free_port()
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


async def test_router_stores_the_gateways_accept_time_as_received_at(make_settings: Callable[..., Settings],
                                                                     sqlite_url: str) -> None:
    """An event's received_at is the accept time the gateway stamped on its message; without a readable stamp,
    or with one ahead of the router's clock, it is when the router stored it."""
    settings = make_settings(database_url=sqlite_url, router_batch_wait_s=0.01)
    _empty_queues(settings)
    stamped = utcnow() - timedelta(seconds=30)
    stamps = {"stamped": stamped.isoformat(), "ahead": (utcnow() + timedelta(hours=1)).isoformat(),
              "garbled": "yesterday"}
    started = utcnow()
    async with RouterHarness(settings) as router:
        for event_id in ("stamped", "ahead", "garbled", "unstamped"):
            headers = {topology.ACCEPTED_AT_HEADER: stamps[event_id]} if event_id in stamps else {}
            router.publish(orjson.dumps({**_EVENT, "id": event_id}), "order.paid", headers=headers)
        await router.wait_for(lambda: router.count(Event) == 4)
        with router.sessions() as session:
            received = {row.id: row.received_at for row in session.execute(select(Event.id, Event.received_at))}
    finished = utcnow()
    assert received.pop("stamped") == stamped
    assert all(started <= at <= finished for at in received.values()), received


async def test_events_refused_while_the_broker_is_away_are_counted_and_logged_with_their_ids(
        make_settings: Callable[..., Settings], sqlite_url: str, log_lines: io.StringIO) -> None:
    """With RabbitMQ unreachable, an event and a batch of two get 503s counted as three unavailable events; the
    event's warning carries its id, the batch's its count and ids, and neither the other's."""
    settings = make_settings(database_url=sqlite_url, broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    unavailable = _accepted("unavailable")
    async with running_gateway(settings) as gateway:
        admin, writer = gateway.auth(Scope.ADMIN), gateway.auth(Scope.EVENTS_WRITE)
        before = await _metrics(gateway, admin)
        assert_problem(await gateway.client.post("/v1/events", json={**_EVENT, "id": "lone"}, headers=writer), 503)
        batch = [{**_EVENT, "id": "first"}, {**_EVENT, "id": "second"}]
        assert_problem(await gateway.client.post("/v1/events/batch", json=batch, headers=writer), 503)
        after = await _metrics(gateway, admin)
    assert after[unavailable] - before[unavailable] == 3
    lines = [line for line in map(orjson.loads, log_lines.getvalue().splitlines())
             if line["event"] == "ingest_not_confirmed"]
    assert [(line.get("event_id"), line.get("event_count"), line.get("event_ids")) for line in lines] == [
        ("lone", None, None), (None, 2, ["first", "second"])]


async def test_metrics_show_unacknowledged_messages_from_the_management_api(make_settings: Callable[..., Settings],
                                                                           sqlite_url: str) -> None:
    """With the management API's URL set, two ingest messages a consumer holds unacked show as
    ``hookgate_queue_messages_unacknowledged`` of ``hookgate.ingest``; RabbitMQ refreshes the figure every 5 s."""
    settings = make_settings(database_url=sqlite_url, broker_management_url=_MANAGEMENT_URL)
    unacked = ("hookgate_queue_messages_unacknowledged", (("queue", topology.INGEST_QUEUE),))
    async with connected_gateway(settings) as gateway:
        admin, writer = gateway.auth(Scope.ADMIN), gateway.auth(Scope.EVENTS_WRITE)
        for _ in range(3):
            assert (await gateway.client.post("/v1/events", json=_EVENT, headers=writer)).status_code == 202
        with Connection(settings.broker_url) as conn:
            channel = conn.channel()
            assert all(channel.basic_get(topology.INGEST_QUEUE, no_ack=False) for _ in range(2))
            seen: list[float | None] = []
            deadline = time.monotonic() + 30
            while (samples := await _metrics(gateway, admin)).get(unacked) != 2 and time.monotonic() < deadline:
                seen.append(samples.get(unacked))
                await asyncio.sleep(0.5)
    assert samples[("hookgate_queue_stats_up", ())] == 1
    assert samples.get(unacked) == 2, seen


def test_the_breaker_state_and_dead_deliveries_show_on_the_workers_port(make_settings: Callable[..., Settings],
                                                                        sqlite_url: str, tmp_path: Path) -> None:
    """Two attempts that fail with no retry left count as dead and open the subscription's breaker
    (``hookgate_endpoint_paused`` 1); a probe that succeeds closes it (0)."""
    port = free_port()
    settings = make_settings(database_url=sqlite_url, worker_metrics_port=port, retry_schedule=(0,),
                             breaker_min_attempts=2, breaker_failure_ratio=0.5, breaker_probe_interval_s=1.0,
                             breaker_probe_interval_max_s=1.0)
    _empty_queues(settings)
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    sender = make_celery(settings)
    secret = make_secret()
    dead = ("hookgate_deliveries_total", (*_WEBHOOK, ("outcome", "dead")))
    with (
        Receiver(secret, default=Reply(500)) as receiver,
        Worker(settings, tmp_path / "worker.log", extra_env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}),
    ):
        subscription_id = add_subscription(sessions, receiver.url, secret)
        paused = ("hookgate_endpoint_paused", (("subscription_id", subscription_id),))
        for delivery_id in [add_delivery(sessions, subscription_id) for _ in range(2)]:
            sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue=topology.WEBHOOKS_QUEUE)
        _scrape_until(port, lambda samples: samples.get(dead) == 2 and samples.get(paused) == 1,
                      "two dead deliveries and the breaker open")
        receiver.respond(200)
        sender.send_task("tasks.deliver_webhook", args=[add_delivery(sessions, subscription_id)],
                         queue=topology.WEBHOOKS_QUEUE)
        _scrape_until(port, lambda samples: samples.get(paused) == 0, "the breaker closed by a probe")
    sender.close()
    engine.dispose()
    assert [r.status for r in receiver.ledger] == [500, 500, 200]


def _emitted_by(configure: str, stderr: int) -> None:
    """Run a process that configures logging as given and logs one line, its output on ``stderr`` (a pipe or a
    terminal's file descriptor)."""
    code = f"import structlog\nfrom consumers.logs import configure_logging\n{configure}\n" \
           "structlog.get_logger('probe').info('terminal_probe', answer=42)\n"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=stderr,
                   stderr=stderr, check=True, timeout=30)


def test_logs_are_human_readable_on_a_terminal_and_json_otherwise() -> None:
    """Without a chosen format a process writes coloured ``key=value`` text when stderr is a terminal, and JSON
    lines when it is a pipe."""
    controller, terminal = pty.openpty()
    try:
        _emitted_by("configure_logging('probe')", terminal)
        text = _terminal_output(controller)
    finally:
        os.close(terminal)
        os.close(controller)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "\x1b[" in text and "terminal_probe" in plain and "answer=42" in plain, text
    assert not any(line.lstrip().startswith("{") for line in plain.splitlines()), text
    read, write = os.pipe()
    _emitted_by("configure_logging('probe')", write)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        (line,) = [orjson.loads(line) for line in pipe.read().splitlines()]
    assert line["event"] == "terminal_probe" and line["answer"] == 42 and line["process"] == "probe"


def _terminal_output(controller: int) -> str:
    """What a finished process wrote to the terminal; the kernel may pass it to this side a moment later."""
    output = b""
    while fd_select.select([controller], [], [], 1.0)[0]:
        output += os.read(controller, 65536)
    return output.decode()


# -- one event through `hookgate serve`, `router` and a webhooks worker, as an operator runs them -----------------

_ROUTER_DOWN_S = 2.0


@dataclass(frozen=True)
class Observed:
    """A running hookgate with default logging, a receiver subscribed to ``order.*``, and the worker's metrics port."""

    stack: ChannelStack
    receiver: Receiver
    subscription_id: str
    worker_metrics_port: int

    def process(self, command: str) -> Hookgate:
        return next(process for process in self.stack.processes if process.args[0] == command)

    def post(self, key: str) -> str:
        """POST an order.paid event whose data is ``{"key": key}``; its id."""
        response = self.stack.api.post("/v1/events", json={**_EVENT, "data": {"key": key}})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def delivered(self, key: str) -> Received:
        """The receiver's request for the event with this key, once it came and its outcome was logged."""
        found: list[Received] = []

        def arrived() -> bool:
            found[:] = [r for r in self.receiver.ledger if r.json()["data"].get("key") == key]
            return bool(found)

        wait_until(arrived, f"the event with key {key} at the receiver", timeout_s=20)
        self.line("worker", lambda line: line["event"] == "webhook delivered"
                  and line.get("delivery_id") == found[0].webhook_id)
        return found[0]

    def line(self, command: str, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first JSON line of a process's log that ``matches``, waiting for it to be written."""
        found: list[dict[str, Any]] = []

        def written() -> bool:
            found[:] = [line for line in _json_lines(self.process(command).log_text()) if matches(line)]
            return bool(found)

        wait_until(written, f"a matching line in the {command}'s log", timeout_s=20)
        return found[0]


def _json_lines(text: str) -> list[dict[str, Any]]:
    # Celery prints a few plain lines of its own, and a line may be half written.
    lines = []
    for line in text.splitlines():
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            lines.append(parsed)
    return lines


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    # A vhost of its own: the module's other tests count what waits in hookgate.ingest, which this router empties.
    directory = tmp_path_factory.mktemp("observed")
    database_url = f"sqlite:///{directory / 'hookgate.db'}"
    migrate(database_url)
    multiproc_dir = directory / "prometheus"
    multiproc_dir.mkdir()
    port = free_port()
    secret = make_secret()
    with fresh_vhost() as broker_url, Receiver(secret) as receiver:
        # Logging as deployed: the default level and format (JSON, stderr being a file).
        settings = Settings(broker_url=broker_url, database_url=database_url, allow_private_targets=True,
                            worker_metrics_port=port, router_batch_wait_s=0.01, subscription_cache_ttl_s=0.2)
        with ChannelStack(settings, directory, workers={"worker": "webhooks"},
                          worker_env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}) as stack:
            subscription_id = add_subscription(stack.sessions, receiver.url, secret)
            stack.wait_for_subscriptions()
            yield Observed(stack, receiver, subscription_id, port)


def test_an_event_is_followed_through_router_and_worker_by_its_ids(observed: Observed) -> None:
    """The router's line for a posted event carries its event and message ids and its delivery; the worker's
    outcome line, written by its recorder thread, the delivery, event and subscription ids, and no task id."""
    key = new_id()
    event_id = observed.post(key)
    delivered = observed.delivered(key)
    routed = observed.line("router", lambda line: line["event"] == "event_routed" and line.get("event_id") == event_id)
    assert routed["message_id"] == event_id and routed["delivery_ids"] == [delivered.webhook_id]
    outcome = observed.line("worker", lambda line: line["event"] == "webhook delivered"
                            and line.get("delivery_id") == delivered.webhook_id)
    assert outcome["event_id"] == event_id and outcome["subscription_id"] == observed.subscription_id
    assert "task_id" not in outcome and outcome["process"] == "worker"


def test_no_payload_body_appears_in_any_log_line(observed: Observed) -> None:
    """An event's data, posted alone and in a batch and delivered, appears in no log of the gateway, the router or
    the worker at the default level."""
    marker = f"payload-marker-{new_id()}"
    observed.post(marker)
    batch = [{**_EVENT, "data": {"key": f"{marker}-{n}"}} for n in range(2)]
    assert observed.stack.api.post("/v1/events/batch", json=batch).status_code == 202
    bodies = [observed.delivered(key).body for key in (marker, f"{marker}-0", f"{marker}-1")]
    assert all(marker.encode() in body for body in bodies)
    logs = {process.log_path.name: process.log_text() for process in observed.stack.processes}
    assert all(logs.values())
    assert [name for name, text in logs.items() if marker in text] == []


def test_delivery_latency_counts_from_the_gateways_accept(observed: Observed) -> None:
    """An event accepted while the router is down is delivered after it is back, and the accepted-to-delivered
    histogram counts the time it waited in RabbitMQ."""
    count, total = (("hookgate_delivery_latency_seconds_count", _WEBHOOK),
                    ("hookgate_delivery_latency_seconds_sum", _WEBHOOK))
    before = _scrape(observed.worker_metrics_port)
    router = observed.process("router")
    router.stop()
    key = new_id()
    accepted = utcnow()
    event_id = observed.post(key)
    time.sleep(_ROUTER_DOWN_S)
    router.start()
    observed.delivered(key)
    after = _scrape_until(observed.worker_metrics_port,
                          lambda samples: samples.get(count, 0.0) > before.get(count, 0.0), "a latency observed")
    assert after[count] - before.get(count, 0.0) == 1
    assert after[total] - before.get(total, 0.0) >= _ROUTER_DOWN_S
    with observed.stack.sessions() as session:
        received_at = session.scalars(select(Event.received_at).where(Event.id == event_id)).one()
    assert accepted <= received_at <= accepted + timedelta(seconds=1)
