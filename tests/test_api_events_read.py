"""``GET /v1/events/{id}``: the stored event with its deliveries and attempts, on both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from urllib.parse import quote

import pytest

from consumers.store.subscriptions import create_subscription
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.keys import Scope
from schemas.settings import Settings
from schemas.subscriptions import SubscriptionCreate
from tests.apiclient import Gateway, assert_problem, insert_delivery, insert_event, running_gateway


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(database_url=store_url)) as gw:
        yield gw


@pytest.fixture
def headers(gateway: Gateway) -> dict[str, str]:
    return gateway.auth(Scope.EVENTS_READ)


def subscription(gateway: Gateway) -> str:
    data = SubscriptionCreate(event_types=["order.#"], url="http://127.0.0.1:9/hook")
    return create_subscription(gateway.sessions, data, owner_key_id=None).id


async def test_an_event_comes_with_its_deliveries_and_every_attempt(gateway: Gateway, headers: dict[str, str]) -> None:
    """The answer holds the structured CloudEvent, each delivery, and each attempt in order with its outcome."""
    event = CloudEvent(
        id="ord-1",
        source="shop",
        type="order.created",
        subject="order/1",
        time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        data={"total": 42},
        extensions={"tenant": "acme"},
    )
    event_pk = insert_event(gateway.sessions, event)
    first, second = subscription(gateway), subscription(gateway)
    outcomes = [(None, "connect timeout"), (503, None), (200, None)]
    delivered = insert_delivery(gateway.sessions, event_pk, first, DeliveryStatus.SUCCEEDED, outcomes)
    waiting = insert_delivery(gateway.sessions, event_pk, second, DeliveryStatus.PENDING)

    response = await gateway.client.get("/v1/events/ord-1", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["event"] == event.structured()
    assert body["received_at"].endswith("Z")
    deliveries = {d["id"]: d for d in body["deliveries"]}
    assert set(deliveries) == {delivered, waiting}
    assert (deliveries[delivered]["subscription_id"], deliveries[delivered]["status"]) == (first, "succeeded")
    attempts = deliveries[delivered]["attempts"]
    assert [(a["number"], a["status_code"], a["error"]) for a in attempts] == [
        (1, None, "connect timeout"),
        (2, 503, None),
        (3, 200, None),
    ]
    assert [a["duration_ms"] for a in attempts] == [12.5, 25.0, 37.5]
    assert all(a["started_at"].endswith("Z") for a in attempts)
    assert deliveries[waiting]["status"] == "pending"
    assert deliveries[waiting]["attempts"] == []


async def test_an_event_without_deliveries_has_an_empty_list(gateway: Gateway, headers: dict[str, str]) -> None:
    """An event no subscription matched is still found, with no deliveries."""
    insert_event(gateway.sessions, CloudEvent(id="lonely", source="shop", type="order.created"))
    body = (await gateway.client.get("/v1/events/lonely", headers=headers)).json()
    assert body["event"]["id"] == "lonely"
    assert body["deliveries"] == []


async def test_an_unknown_event_is_a_404_problem(gateway: Gateway, headers: dict[str, str]) -> None:
    """No event with the id answers 404; so does a known id with another source."""
    insert_event(gateway.sessions, CloudEvent(id="known", source="shop", type="order.created"))
    body = assert_problem(await gateway.client.get("/v1/events/unknown", headers=headers), 404)
    assert "unknown" in body["detail"]
    assert_problem(await gateway.client.get("/v1/events/known?source=elsewhere", headers=headers), 404)


async def test_an_id_shared_by_two_sources_needs_the_source(gateway: Gateway, headers: dict[str, str]) -> None:
    """When two sources used one id, the bare id answers 409 listing them and `?source=` picks one."""
    insert_event(gateway.sessions, CloudEvent(id="dup", source="shop", type="order.created", data=1))
    insert_event(gateway.sessions, CloudEvent(id="dup", source="billing", type="invoice.paid", data=2))
    body = assert_problem(await gateway.client.get("/v1/events/dup", headers=headers), 409)
    assert "source" in body["detail"]
    assert body["sources"] == ["billing", "shop"]
    response = await gateway.client.get("/v1/events/dup", params={"source": "billing"}, headers=headers)
    assert response.json()["event"]["data"] == 2


async def test_ids_with_slashes_are_found_url_encoded(gateway: Gateway, headers: dict[str, str]) -> None:
    """CloudEvents ids are any string: one containing '/' is asked for percent-encoded."""
    insert_event(gateway.sessions, CloudEvent(id="a/b c", source="urn:x", type="order.created"))
    response = await gateway.client.get(f"/v1/events/{quote('a/b c', safe='')}", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["event"]["id"] == "a/b c"


@pytest.mark.parametrize(("scopes", "status"), [((), 401), ((Scope.EVENTS_WRITE, Scope.SUBSCRIPTIONS), 403)])
async def test_reading_events_needs_the_events_read_scope(
    gateway: Gateway, scopes: tuple[Scope, ...], status: int
) -> None:
    """Without a key the answer is 401; a key without `events:read` gets 403."""
    insert_event(gateway.sessions, CloudEvent(id="secret", source="shop", type="order.created"))
    headers = gateway.auth(*scopes) if scopes else {}
    assert_problem(await gateway.client.get("/v1/events/secret", headers=headers), status)
