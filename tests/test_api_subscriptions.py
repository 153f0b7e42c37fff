"""``/v1/subscriptions`` on the real app and both stores: CRUD, paging, secrets, SSRF, and refusals."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import select

from consumers.store.models import Subscription
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import (
    Gateway,
    assert_problem,
    count_rows,
    delivery_status,
    insert_delivery,
    insert_event,
    running_gateway,
)

# A public address needs no DNS to resolve, so it passes the SSRF guard on a machine without internet.
PUBLIC_URL = "https://93.184.216.34/hooks/orders"
LOOPBACK_URL = "http://127.0.0.1:8999/hook"
SECRET_RE = re.compile(r"whsec_[A-Za-z0-9+/]{32}")


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(database_url=store_url)) as gw:
        yield gw


@pytest.fixture
async def strict_gateway(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[Gateway]:
    """A gateway that refuses private webhook targets, as production does."""
    async with running_gateway(make_settings(database_url=store_url, allow_private_targets=False)) as gw:
        yield gw


@pytest.fixture
def headers(gateway: Gateway) -> dict[str, str]:
    return gateway.auth(Scope.SUBSCRIPTIONS)


async def create(gateway: Gateway, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"event_types": ["order.*"], "url": LOOPBACK_URL, **fields}
    response = await gateway.client.post("/v1/subscriptions", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def test_create_answers_201_with_id_secret_and_location(gateway: Gateway, headers: dict[str, str]) -> None:
    """Creating returns the stored subscription with a generated `whsec_` secret and its Location."""
    response = await gateway.client.post(
        "/v1/subscriptions",
        json={"event_types": ["order.*", "invoice.#"], "url": LOOPBACK_URL, "description": "orders"},
        headers=headers,
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert SECRET_RE.fullmatch(created["secret"])
    assert response.headers["location"] == f"/v1/subscriptions/{created['id']}"
    assert created["channel"] == "webhook"
    assert created["event_types"] == ["order.*", "invoice.#"]
    assert (created["url"], created["description"], created["enabled"]) == (LOOPBACK_URL, "orders", True)
    with gateway.sessions() as session:
        row = session.execute(select(Subscription).where(Subscription.id == created["id"])).scalar_one()
    assert row.secret == created["secret"]
    assert row.owner_key_id is not None


async def test_a_given_secret_is_kept(gateway: Gateway, headers: dict[str, str]) -> None:
    """A client may bring its own signing secret."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    created = await create(gateway, headers, secret=secret)
    assert created["secret"] == secret
    response = await gateway.client.get(f"/v1/subscriptions/{created['id']}/secret", headers=headers)
    assert response.json() == {"secret": secret, "previous_secret_expires_at": None}


async def test_get_shows_the_subscription_without_its_secret(gateway: Gateway, headers: dict[str, str]) -> None:
    """GET by id has every field but the secret, which only `/secret` returns."""
    created = await create(gateway, headers)
    response = await gateway.client.get(f"/v1/subscriptions/{created['id']}", headers=headers)
    assert response.status_code == 200
    shown = response.json()
    assert "secret" not in shown
    assert created["secret"] not in response.text
    assert shown == {k: v for k, v in created.items() if k != "secret"}
    response = await gateway.client.get(f"/v1/subscriptions/{created['id']}/secret", headers=headers)
    assert response.json() == {"secret": created["secret"], "previous_secret_expires_at": None}


async def test_list_pages_in_creation_order_without_secrets(gateway: Gateway, headers: dict[str, str]) -> None:
    """Paging with `limit` and `after` visits every subscription once, oldest first, and shows no secret."""
    created = [await create(gateway, headers, description=f"n{i}") for i in range(5)]
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params = {"limit": "2"} | ({"after": after} if after else {})
        response = await gateway.client.get("/v1/subscriptions", params=params, headers=headers)
        assert response.status_code == 200, response.text
        assert "whsec_" not in response.text
        page = response.json()
        assert all("secret" not in item for item in page["items"])
        seen += [item["id"] for item in page["items"]]
        pages += 1
        after = page["next_after"]
        if after is None:
            break
    assert seen == [c["id"] for c in created]
    assert pages == 3


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=many"])
async def test_a_bad_page_size_is_a_422_naming_limit(gateway: Gateway, headers: dict[str, str], query: str) -> None:
    """`limit` outside 1..200 or not a number is refused with an errors list naming it."""
    body = assert_problem(await gateway.client.get(f"/v1/subscriptions?{query}", headers=headers), 422)
    assert [e["field"] for e in body["errors"]] == ["limit"]


async def test_patch_changes_only_the_fields_sent(gateway: Gateway, headers: dict[str, str]) -> None:
    """PATCH can disable, retarget and re-describe a subscription; other fields stay, updated_at moves."""
    created = await create(gateway, headers, description="before")
    path = f"/v1/subscriptions/{created['id']}"
    response = await gateway.client.patch(
        path, json={"enabled": False, "event_types": ["invoice.paid"], "url": "http://localhost:9/new"}, headers=headers
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert "secret" not in updated
    assert (updated["enabled"], updated["event_types"], updated["url"]) == (False, ["invoice.paid"], "http://localhost:9/new")
    assert updated["description"] == "before"
    assert updated["updated_at"] > created["updated_at"]
    response = await gateway.client.patch(path, json={"description": "after", "enabled": True}, headers=headers)
    assert (response.json()["description"], response.json()["enabled"]) == ("after", True)
    assert (await gateway.client.get(path, headers=headers)).json() == response.json()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": None}, ""),
        ({"event_types": []}, "event_types"),
        ({"event_types": ["order..x"]}, "event_types"),
        ({"secret": "whsec_x"}, "secret"),
        ({"channel": "email"}, "channel"),
    ],
)
async def test_a_bad_patch_is_a_422_and_changes_nothing(
    gateway: Gateway, headers: dict[str, str], change: dict[str, Any], field: str
) -> None:
    """Nulls, empty or invalid patterns and unknown fields are refused with errors, and nothing changes."""
    created = await create(gateway, headers)
    path = f"/v1/subscriptions/{created['id']}"
    body = assert_problem(await gateway.client.patch(path, json=change, headers=headers), 422)
    assert body["errors"] and all(e["field"].startswith(field) for e in body["errors"])
    after = (await gateway.client.get(path, headers=headers)).json()
    assert after == {k: v for k, v in created.items() if k != "secret"}


async def test_delete_hides_the_subscription_and_cancels_its_open_deliveries(
    gateway: Gateway, headers: dict[str, str]
) -> None:
    """DELETE answers 204; the subscription is gone from the API and its pending and retrying deliveries are
    cancelled, while finished ones and other subscriptions' deliveries are untouched."""
    doomed = await create(gateway, headers)
    kept = await create(gateway, headers)
    event_pk = insert_event(gateway.sessions, CloudEvent(id="e1", source="test", type="order.created"))
    other_pk = insert_event(gateway.sessions, CloudEvent(id="e2", source="test", type="order.created"))
    pending = insert_delivery(gateway.sessions, event_pk, doomed["id"], DeliveryStatus.PENDING)
    retrying = insert_delivery(gateway.sessions, other_pk, doomed["id"], DeliveryStatus.RETRYING, [(500, None)])
    elsewhere = insert_delivery(gateway.sessions, event_pk, kept["id"], DeliveryStatus.PENDING)
    done_pk = insert_event(gateway.sessions, CloudEvent(id="e3", source="test", type="order.created"))
    done = insert_delivery(gateway.sessions, done_pk, doomed["id"], DeliveryStatus.SUCCEEDED, [(200, None)])

    path = f"/v1/subscriptions/{doomed['id']}"
    response = await gateway.client.delete(path, headers=headers)
    assert response.status_code == 204
    assert response.content == b""

    assert delivery_status(gateway.sessions, pending) == "cancelled"
    assert delivery_status(gateway.sessions, retrying) == "cancelled"
    assert delivery_status(gateway.sessions, done) == "succeeded"
    assert delivery_status(gateway.sessions, elsewhere) == "pending"
    assert_problem(await gateway.client.get(path, headers=headers), 404)
    assert_problem(await gateway.client.get(f"{path}/secret", headers=headers), 404)
    assert_problem(await gateway.client.patch(path, json={"enabled": True}, headers=headers), 404)
    assert_problem(await gateway.client.delete(path, headers=headers), 404)
    listed = (await gateway.client.get("/v1/subscriptions", headers=headers)).json()
    assert [s["id"] for s in listed["items"]] == [kept["id"]]
    with gateway.sessions() as session:
        row = session.execute(select(Subscription).where(Subscription.id == doomed["id"])).scalar_one()
    assert row.deleted_at is not None and row.enabled is False


async def test_unknown_ids_are_404_problems(gateway: Gateway, headers: dict[str, str]) -> None:
    """Every per-subscription route answers 404 for an id that does not exist."""
    path = "/v1/subscriptions/0190f0f0-0000-7000-8000-000000000000"
    for response in (
        await gateway.client.get(path, headers=headers),
        await gateway.client.get(f"{path}/secret", headers=headers),
        await gateway.client.patch(path, json={"enabled": False}, headers=headers),
        await gateway.client.delete(path, headers=headers),
    ):
        assert_problem(response, 404)


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"content": b'{"event_types": ["a"], "url": ', "headers": {"Content-Type": "application/json"}}, 400),
        ({"content": b"event_types=a", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415),
        ({"content": b'{"event_types": ["a"]}', "headers": {}}, 415),
        ({"json": {"url": LOOPBACK_URL}}, 422),
        ({"json": {"event_types": ["order.*"]}}, 422),
        ({"json": {"event_types": ["order.*"], "url": "ftp://example.com/x"}}, 422),
        ({"json": {"event_types": ["order.*"], "url": LOOPBACK_URL, "colour": "red"}}, 422),
        ({"json": {"event_types": ["order.*"], "url": LOOPBACK_URL, "channel": "email"}}, 422),
        ({"json": ["not", "an", "object"]}, 422),
    ],
)
async def test_a_rejected_create_is_a_problem_and_stores_nothing(
    gateway: Gateway, headers: dict[str, str], request_kwargs: dict[str, Any], status: int
) -> None:
    """Malformed JSON (400), a non-JSON body (415) and invalid fields (422, with `errors`) create no row."""
    merged = {**request_kwargs, "headers": {**headers, **request_kwargs.get("headers", {})}}
    body = assert_problem(await gateway.client.post("/v1/subscriptions", **merged), status)
    if status == 422:
        assert body["errors"] and all({"field", "message"} <= set(e) for e in body["errors"])
    assert count_rows(gateway.sessions, Subscription) == 0


@pytest.mark.parametrize(("scopes", "status"), [((), 401), ((Scope.EVENTS_WRITE, Scope.EVENTS_READ), 403)])
async def test_unauthorised_creates_store_nothing(
    gateway: Gateway, scopes: tuple[Scope, ...], status: int
) -> None:
    """Without a key (401) or without the subscriptions scope (403), nothing is created."""
    headers = gateway.auth(*scopes) if scopes else {}
    body = {"event_types": ["order.*"], "url": LOOPBACK_URL}
    assert_problem(await gateway.client.post("/v1/subscriptions", json=body, headers=headers), status)
    assert count_rows(gateway.sessions, Subscription) == 0


@pytest.mark.parametrize(
    "url",
    [LOOPBACK_URL, "http://10.0.0.8/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]/hook",
     "http://2130706433/hook"],
)
async def test_create_refuses_private_targets(strict_gateway: Gateway, url: str) -> None:
    """With private targets disallowed, loopback, private, metadata and disguised addresses get 422 on `url`."""
    headers = strict_gateway.auth(Scope.SUBSCRIPTIONS)
    response = await strict_gateway.client.post(
        "/v1/subscriptions", json={"event_types": ["order.*"], "url": url}, headers=headers
    )
    body = assert_problem(response, 422)
    assert [e["field"] for e in body["errors"]] == ["url"]
    assert "non-public" in body["detail"]
    assert count_rows(strict_gateway.sessions, Subscription) == 0


async def test_update_refuses_private_targets_and_keeps_the_old_url(strict_gateway: Gateway) -> None:
    """A PATCH to a private URL is refused with 422 and the subscription keeps its public URL."""
    headers = strict_gateway.auth(Scope.SUBSCRIPTIONS)
    created = await create(strict_gateway, headers, url=PUBLIC_URL)
    path = f"/v1/subscriptions/{created['id']}"
    body = assert_problem(await strict_gateway.client.patch(path, json={"url": LOOPBACK_URL}, headers=headers), 422)
    assert "127.0.0.1" in body["detail"]
    assert (await strict_gateway.client.get(path, headers=headers)).json()["url"] == PUBLIC_URL
