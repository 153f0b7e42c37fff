"""Delivery fields of `/v1/subscriptions` on both stores: retry_schedule, payload_format, limits, disabled_reason."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import update

from consumers.store.models import Subscription
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, assert_problem, count_rows, running_gateway

URL = "http://127.0.0.1:8999/hook"
DEFAULTS = {"retry_schedule": None, "payload_format": "standard-webhooks", "rate_limit_per_s": None,
            "max_in_flight": None, "disabled_reason": None}


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(database_url=store_url)) as gw:
        yield gw


@pytest.fixture
def headers(gateway: Gateway) -> dict[str, str]:
    return gateway.auth(Scope.SUBSCRIPTIONS)


async def create(gateway: Gateway, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    response = await gateway.client.post("/v1/subscriptions", headers=headers,
                                         json={"event_types": ["order.*"], "url": URL, **fields})
    assert response.status_code == 201, response.text
    return dict(response.json())


def delivery_fields(shown: dict[str, Any]) -> dict[str, Any]:
    return {name: shown[name] for name in DEFAULTS}


async def test_defaults_are_shown(gateway: Gateway, headers: dict[str, str]) -> None:
    """Without the fields, a subscription uses the global schedule and limits and Standard Webhooks."""
    assert delivery_fields(await create(gateway, headers)) == DEFAULTS


async def test_fields_are_stored_shown_and_listed(gateway: Gateway, headers: dict[str, str]) -> None:
    """Given fields come back on create, read and list."""
    fields = {"retry_schedule": [0, 5, 60], "payload_format": "cloudevents", "rate_limit_per_s": 2.5,
              "max_in_flight": 4}
    created = await create(gateway, headers, **fields)
    expected = {**DEFAULTS, **fields}
    shown = (await gateway.client.get(f"/v1/subscriptions/{created['id']}", headers=headers)).json()
    listed = (await gateway.client.get("/v1/subscriptions", headers=headers)).json()["items"]
    assert [delivery_fields(created), delivery_fields(shown), delivery_fields(listed[0])] == [expected] * 3


async def test_patch_changes_and_null_resets_to_the_global_default(gateway: Gateway, headers: dict[str, str]) -> None:
    """PATCH sets the fields sent; null puts the schedule and limits back to the global defaults."""
    created = await create(gateway, headers, retry_schedule=[0, 1], rate_limit_per_s=10, max_in_flight=2)
    path = f"/v1/subscriptions/{created['id']}"
    changed = await gateway.client.patch(path, headers=headers, json={"retry_schedule": [0, 30, 300],
                                                                       "payload_format": "cloudevents"})
    assert delivery_fields(changed.json()) == {**DEFAULTS, "retry_schedule": [0, 30, 300],
                                               "payload_format": "cloudevents", "rate_limit_per_s": 10,
                                               "max_in_flight": 2}
    reset = await gateway.client.patch(path, headers=headers, json={"retry_schedule": None, "rate_limit_per_s": None,
                                                                     "max_in_flight": None})
    assert delivery_fields(reset.json()) == {**DEFAULTS, "payload_format": "cloudevents"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"retry_schedule": []}, "retry_schedule"),
        ({"retry_schedule": [0, -5]}, "retry_schedule"),
        ({"retry_schedule": [0, 8 * 24 * 3600]}, "retry_schedule"),
        ({"payload_format": "xml"}, "payload_format"),
        ({"rate_limit_per_s": 0}, "rate_limit_per_s"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"disabled_reason": "mine"}, "disabled_reason"),
    ],
)
async def test_invalid_fields_get_422_and_store_nothing(gateway: Gateway, headers: dict[str, str],
                                                        fields: dict[str, Any], field: str) -> None:
    """Bad schedules, formats and limits, and the read-only disabled_reason, are refused by field."""
    response = await gateway.client.post("/v1/subscriptions", headers=headers,
                                         json={"event_types": ["order.*"], "url": URL, **fields})
    body = assert_problem(response, 422)
    assert [e["field"] for e in body["errors"]] == [field]
    assert count_rows(gateway.sessions, Subscription) == 0


async def test_payload_format_cannot_be_patched_to_null(gateway: Gateway, headers: dict[str, str]) -> None:
    """payload_format has no global default to fall back to: null is refused."""
    created = await create(gateway, headers)
    response = await gateway.client.patch(f"/v1/subscriptions/{created['id']}", headers=headers,
                                          json={"payload_format": None})
    assert "payload_format cannot be null" in assert_problem(response, 422)["detail"]


async def test_disabled_reason_is_shown_and_cleared_on_re_enabling(gateway: Gateway, headers: dict[str, str]) -> None:
    """A subscription hookgate disabled shows why; a client's `enabled: true` clears the reason."""
    created = await create(gateway, headers)
    with gateway.sessions.begin() as session:
        session.execute(update(Subscription).where(Subscription.id == created["id"])
                        .values(enabled=False, disabled_reason="the endpoint answered HTTP 410"))
    path = f"/v1/subscriptions/{created['id']}"
    shown = (await gateway.client.get(path, headers=headers)).json()
    assert (shown["enabled"], shown["disabled_reason"]) == (False, "the endpoint answered HTTP 410")
    enabled = (await gateway.client.patch(path, headers=headers, json={"enabled": True})).json()
    assert (enabled["enabled"], enabled["disabled_reason"]) == (True, None)
