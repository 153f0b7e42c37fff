"""Payload formats per subscription, sent by a real worker to real receivers: Standard Webhooks JSON and CloudEvents."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat

from consumers.store.database import migrate
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.settings import Settings
from tests.delivery_stack import DeliveryStack, delivery_stack
from tests.receiver import Received, Receiver, make_secret


@pytest.fixture(scope="module")
async def stack(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DeliveryStack]:
    """On SQLite only: the format is chosen in Python, after the claim that test_secret_rotation runs on both."""
    store = f"sqlite:///{tmp_path_factory.mktemp('store') / 'hookgate.db'}"
    migrate(store)
    settings = Settings(broker_url=broker_url, database_url=store, allow_private_targets=True,
                        retry_schedule=(0,))  # type: ignore[arg-type]
    async with delivery_stack(settings, tmp_path_factory.mktemp("worker")) as running:
        yield running




def order_event(**fields: object) -> CloudEvent:
    values: dict[str, object] = {
        "id": new_id(), "source": "tests/format", "type": "order.created", "subject": "order-7",
        "time": datetime(2026, 11, 25, 12, 0, tzinfo=UTC), "datacontenttype": "application/json",
        "data": {"order": 7, "lines": [1, 2]}, "extensions": {"tenant": "acme"},
    }
    values.update(fields)
    return CloudEvent.model_validate(values)


def parse_cloudevent(received: Received):  # type: ignore[no-untyped-def]
    """The request as the CloudEvents SDK's HTTP binding reads it (binary mode if any ce- header, else structured)."""
    return from_http(HTTPMessage(headers=received.headers, body=received.body), JSONFormat())


async def test_cloudevents_subscription_gets_the_structured_event_signed(
    stack: DeliveryStack
) -> None:
    """`payload_format: cloudevents` sends the stored structured event as application/cloudevents+json, signed."""
    secret = make_secret()
    event = order_event()
    with Receiver(secret) as receiver:
        created = await stack.client.post("/v1/subscriptions", json={
            "event_types": ["order.*"], "url": receiver.url, "secret": secret, "payload_format": "cloudevents"})
        assert created.json()["payload_format"] == "cloudevents"
        delivery_id = stack.deliver(created.json()["id"], event)
        [received] = receiver.wait_for(1)
    assert received.verified, received.error
    assert (received.headers["content-type"], received.headers["webhook-id"]) == (
        "application/cloudevents+json", delivery_id)
    assert received.body == event.to_json()
    parsed = parse_cloudevent(received)
    assert (parsed.get_id(), parsed.get_source(), parsed.get_type(), parsed.get_subject(), parsed.get_time()) == (
        event.id, "tests/format", "order.created", "order-7", event.time)
    assert parsed.get_data() == {"order": 7, "lines": [1, 2]}
    assert parsed.get_extension("tenant") == "acme"


async def test_binary_data_travels_as_data_base64(stack: DeliveryStack) -> None:
    """An event with binary data reaches a CloudEvents receiver as the same bytes."""
    secret = make_secret()
    payload = bytes(range(256))
    event = order_event(data=None, datacontenttype="application/octet-stream",
                        data_base64=base64.b64encode(payload).decode())
    with Receiver(secret) as receiver:
        created = await stack.client.post("/v1/subscriptions", json={
            "event_types": ["order.*"], "url": receiver.url, "secret": secret, "payload_format": "cloudevents"})
        stack.deliver(created.json()["id"], event)
        [received] = receiver.wait_for(1)
    assert received.verified
    assert parse_cloudevent(received).get_data() == payload


async def test_standard_webhooks_is_the_default_and_patch_switches_format(
    stack: DeliveryStack
) -> None:
    """By default the body is {type, timestamp, data} as application/json; after a PATCH, a CloudEvent."""
    secret = make_secret()
    with Receiver(secret) as receiver:
        created = await stack.client.post("/v1/subscriptions",
                                            json={"event_types": ["order.*"], "url": receiver.url, "secret": secret})
        subscription_id = created.json()["id"]
        assert created.json()["payload_format"] == "standard-webhooks"
        stack.deliver(subscription_id, order_event())
        receiver.wait_for(1)
        patched = await stack.client.patch(f"/v1/subscriptions/{subscription_id}",
                                             json={"payload_format": "cloudevents"})
        assert patched.json()["payload_format"] == "cloudevents"
        second = order_event()
        stack.deliver(subscription_id, second)
        standard, cloudevent = receiver.wait_for(2)
    assert standard.verified and cloudevent.verified
    assert standard.headers["content-type"] == "application/json"
    assert standard.json() == {"type": "order.created", "timestamp": "2026-11-25T12:00:00+00:00",
                               "data": {"order": 7, "lines": [1, 2]}}
    assert cloudevent.headers["content-type"] == "application/cloudevents+json"
    assert parse_cloudevent(cloudevent).get_id() == second.id
