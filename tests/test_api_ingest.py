"""HTTP ingest: every accepted event is on RabbitMQ before the 202; every rejected one changes nothing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent as LibCloudEvent
from kombu import Connection

from consumers.topology import ingest_queue
from schemas.events import MAX_BATCH_EVENTS
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, assert_problem, connected_gateway, running_gateway


def _ingested(broker_url: str) -> list[dict[str, Any]]:
    """Every message now in hookgate.ingest, consumed: structured CloudEvents plus their AMQP properties."""
    out = []
    with Connection(broker_url) as conn:
        queue = ingest_queue(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            out.append({"event": orjson.loads(message.body), "message_id": message.properties["message_id"],
                        "routing_key": message.delivery_info["routing_key"],
                        "persistent": message.properties["delivery_mode"] == 2})
    return out


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], sqlite_url: str) -> AsyncIterator[Gateway]:
    async with connected_gateway(make_settings(database_url=sqlite_url, max_body_bytes=64 * 1024)) as gw:
        yield gw


async def test_plain_json_event_is_on_the_queue_when_202_arrives(gateway: Gateway, broker_url: str) -> None:
    """A plain event answers 202 with its id, and is already a persistent message routed by its type."""
    response = await gateway.client.post("/v1/events", headers=gateway.auth(Scope.EVENTS_WRITE),
                                         json={"type": "order.paid", "source": "shop", "data": {"total": 12}})
    assert response.status_code == 202, response.text
    event_id = response.json()["id"]
    (message,) = _ingested(broker_url)
    assert message["message_id"] == event_id and message["routing_key"] == "order.paid" and message["persistent"]
    assert message["event"]["data"] == {"total": 12} and message["event"]["specversion"] == "1.0"


async def test_missing_source_comes_from_the_key(gateway: Gateway, broker_url: str) -> None:
    """An event without source gets one derived from the API key that sent it."""
    response = await gateway.client.post("/v1/events", headers=gateway.auth(Scope.EVENTS_WRITE),
                                         json={"type": "order.paid"})
    assert response.status_code == 202
    (message,) = _ingested(broker_url)
    assert message["event"]["source"].startswith("urn:hookgate:key:")


async def test_structured_and_binary_cloudevents_from_the_reference_library(gateway: Gateway,
                                                                              broker_url: str) -> None:
    """Events encoded by the cloudevents library in structured and binary mode arrive intact."""
    auth = gateway.auth(Scope.EVENTS_WRITE)
    event = LibCloudEvent({"id": "ce-1", "source": "/orders", "type": "order.shipped", "subject": "o-1",
                           "datacontenttype": "application/json", "traceparent": "00-abc"}, {"n": 1})
    for encode in (ce_http.to_structured_event, ce_http.to_binary_event):
        message = encode(event)
        response = await gateway.client.post("/v1/events", headers={**auth, **message.headers},
                                             content=message.body)
        assert response.status_code == 202, response.text
        assert response.json() == {"id": "ce-1"}
    structured, binary = _ingested(broker_url)
    for got in (structured["event"], binary["event"]):
        assert (got["id"], got["source"], got["type"], got["subject"], got["data"], got["traceparent"]) == (
            "ce-1", "/orders", "order.shipped", "o-1", {"n": 1}, "00-abc")


async def test_idempotency_key_sets_the_event_id(gateway: Gateway, broker_url: str) -> None:
    """Two posts with one Idempotency-Key carry the same event id, so the router stores one event."""
    headers = {**gateway.auth(Scope.EVENTS_WRITE), "Idempotency-Key": "order-77-paid"}
    ids = [
        (await gateway.client.post("/v1/events", headers=headers, json={"type": "order.paid", "source": "s"})).json()
        for _ in range(2)
    ]
    assert ids == [{"id": "order-77-paid"}] * 2
    assert [m["event"]["id"] for m in _ingested(broker_url)] == ["order-77-paid"] * 2


@pytest.mark.parametrize("content_type", ["application/json", "application/cloudevents-batch+json"])
async def test_batch_is_accepted_whole(gateway: Gateway, broker_url: str, content_type: str) -> None:
    """A batch answers 202 with every id in order, and every event is on the queue."""
    events = [{"specversion": "1.0", "id": f"b-{i}", "source": "s", "type": f"batch.n{i}"} for i in range(25)]
    response = await gateway.client.post("/v1/events/batch", content=orjson.dumps(events),
                                         headers={**gateway.auth(Scope.EVENTS_WRITE), "Content-Type": content_type})
    assert response.status_code == 202, response.text
    assert response.json() == {"ids": [f"b-{i}" for i in range(25)]}
    assert sorted(m["message_id"] for m in _ingested(broker_url)) == sorted(f"b-{i}" for i in range(25))


def _rejections() -> list[tuple[str, dict[str, str], bytes, int, str]]:
    plain = {"Content-Type": "application/json"}
    return [
        ("/v1/events", plain, b'{"type": "a", "source": ', 400, "not valid JSON"),
        ("/v1/events", {"Content-Type": "text/plain"}, b"hello", 415, "unsupported content type"),
        ("/v1/events", {}, b'{"type": "a"}', 415, "unsupported content type"),
        ("/v1/events", plain, b'{"source": "s"}', 422, "type"),
        ("/v1/events", plain, b'{"type": "a b", "source": "s"}', 422, "type"),
        ("/v1/events", plain, b'{"type": "a", "colour": "red"}', 422, "unknown field"),
        ("/v1/events", {"Content-Type": "application/cloudevents+json"}, b'{"type": "a", "source": "s"}', 422,
         "specversion"),
        ("/v1/events", {**plain, "Idempotency-Key": "k" * 300}, b'{"type": "a"}', 400, "Idempotency-Key"),
        ("/v1/events", plain, b'{"type": "a", "data": "' + b"x" * 70_000 + b'"}', 413, "limit"),
        ("/v1/events/batch", plain, b"[]", 422, "non-empty"),
        ("/v1/events/batch", plain, b'[{"type": "ok"}, {"source": "no-type"}]', 422, "event 1"),
        ("/v1/events/batch", {"Content-Type": "application/cloudevents-batch+json"}, b'[{"type": "a"}]', 422,
         "specversion"),
        ("/v1/events/batch", plain, orjson.dumps([{"type": "a"}] * (MAX_BATCH_EVENTS + 1)), 422, "at most"),
        ("/v1/events/batch", {**plain, "Idempotency-Key": "x"}, b'[{"type": "a"}]', 400, "Idempotency-Key"),
    ]


@pytest.mark.parametrize(("path", "headers", "body", "status", "fragment"), _rejections())
async def test_rejected_requests_answer_a_problem_and_publish_nothing(
    gateway: Gateway, broker_url: str, path: str, headers: dict[str, str], body: bytes, status: int, fragment: str
) -> None:
    """Each malformed request gets its 4xx problem body with a useful detail, and nothing reaches the queue."""
    response = await gateway.client.post(path, content=body, headers={**gateway.auth(Scope.EVENTS_WRITE), **headers})
    problem = assert_problem(response, status)
    assert fragment in problem["detail"]
    assert _ingested(broker_url) == []


async def test_batch_with_one_bad_event_publishes_none(gateway: Gateway, broker_url: str) -> None:
    """A batch is validated whole before anything is published: one bad event, no event published."""
    response = await gateway.client.post("/v1/events/batch", headers=gateway.auth(Scope.EVENTS_WRITE),
                                         json=[{"type": "good.one"}, {"type": "bad one"}])
    assert assert_problem(response, 422)["index"] == 1
    assert _ingested(broker_url) == []


@pytest.mark.parametrize(("scopes", "status"), [((), 401), ((Scope.EVENTS_READ,), 403)])
async def test_ingest_needs_the_events_write_scope(gateway: Gateway, broker_url: str, scopes: tuple[Scope, ...],
                                                   status: int) -> None:
    """Without a key the answer is 401, with a key lacking events:write 403, and nothing is published."""
    headers = gateway.auth(*scopes) if scopes else {}
    response = await gateway.client.post("/v1/events", headers=headers, json={"type": "a.b"})
    assert_problem(response, status)
    assert _ingested(broker_url) == []


async def test_broker_unreachable_answers_503_with_retry_after_quickly(make_settings: Callable[..., Settings],
                                                                      sqlite_url: str) -> None:
    """With no broker, ingest answers 503 with Retry-After within a bounded time, never 202."""
    settings = make_settings(database_url=sqlite_url, broker_url="amqp://guest:guest@127.0.0.1:1//")
    async with running_gateway(settings) as gw:
        started = time.monotonic()
        response = await gw.client.post("/v1/events", headers=gw.auth(Scope.EVENTS_WRITE), json={"type": "a.b"})
        elapsed = time.monotonic() - started
    assert_problem(response, 503)
    assert response.headers["retry-after"] == str(settings.broker_retry_after_s)
    assert elapsed < 1.0
