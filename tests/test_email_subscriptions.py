"""Creating email and task subscriptions through the real app, both stores: stored options, and refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from consumers.store.models import Subscription
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, assert_problem, count_rows, running_gateway
from tests.channel_seeding import TEMPLATE, email_fields


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(database_url=store_url)) as gw:
        gw.client.headers.update(gw.auth(Scope.SUBSCRIPTIONS))
        yield gw


async def test_an_email_subscription_keeps_its_fields_as_options(gateway: Gateway) -> None:
    """An email subscription answers 201 with its recipients, sender and template as options, and no secret."""
    response = await gateway.client.post("/v1/subscriptions", json=email_fields(to=["Ada@Example.com"]))
    assert response.status_code == 201, response.text
    created = response.json()

    assert created["channel"] == "email" and created["url"] is None and created["secret"] is None
    assert created["options"] == {"to": ["Ada@example.com"], "from": "shop@example.com",
                                  "reply_to": "help@example.com", "template": TEMPLATE}
    fetched = await gateway.client.get(f"/v1/subscriptions/{created['id']}")
    assert fetched.json()["options"] == created["options"]
    assert (await gateway.client.get(f"/v1/subscriptions/{created['id']}/secret")).status_code == 409


async def test_a_task_subscription_keeps_its_task_and_queue(gateway: Gateway) -> None:
    """A task subscription answers 201 with its task and queue as options."""
    response = await gateway.client.post("/v1/subscriptions", json={
        "channel": "task", "task": "billing.tasks.handle_invoice", "queue": "billing", "event_types": ["invoice.*"]})
    assert response.status_code == 201, response.text
    assert response.json()["options"] == {"task": "billing.tasks.handle_invoice", "queue": "billing"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (email_fields(to=["not an address"]), "to"),
        (email_fields(to="data/customer/email"), "to"),
        (email_fields(to=[]), "to"),
        (email_fields(to=[f"u{i}@example.com" for i in range(51)]), "to"),
        (email_fields(**{"from": "nobody"}), "from"),
        (email_fields(reply_to="@example.com"), "reply_to"),
        (email_fields(template={"subject": "{% if %}", "text": "t"}), "template.subject"),
        (email_fields(template={"subject": "s", "text": "{{ data.x "}), "template.text"),
        (email_fields(template={"subject": "s"}), "template.text"),
        (email_fields(template={"subject": "s", "text": "t", "markdown": "m"}), "template.markdown"),
        (email_fields(template=None), ""),
        (email_fields(url="https://93.184.216.34/x"), ""),
        (email_fields(task="billing.tasks.x"), ""),
        (email_fields(options={"to": ["a@example.com"]}), ""),
        ({"channel": "task", "task": "billing.tasks.x", "event_types": ["a"]}, ""),
        ({"channel": "task", "task": "tasks.deliver_webhooks", "queue": "billing", "event_types": ["a"]}, "task"),
        ({"channel": "task", "task": "handle_invoice", "queue": "billing", "event_types": ["a"]}, "task"),
        ({"channel": "task", "task": "billing.tasks.x", "queue": "webhooks", "event_types": ["a"]}, "queue"),
        ({"channel": "task", "task": "billing.tasks.x", "queue": "amq.direct", "event_types": ["a"]}, "queue"),
        ({"channel": "task", "task": "billing.tasks.x", "queue": "billing.#", "event_types": ["a"]}, "queue"),
        ({"channel": "webhook", "url": "https://93.184.216.34/x", "queue": "billing", "event_types": ["a"]}, ""),
    ],
    ids=["bad-to", "pointer-without-slash", "no-recipients", "too-many-recipients", "bad-from", "bad-reply-to",
         "subject-syntax", "text-syntax", "no-text", "unknown-template-part", "no-template", "email-with-url",
         "email-with-task-field", "options-given", "task-without-queue", "reserved-task", "undotted-task",
         "builtin-queue", "amq-queue", "wildcard-queue", "webhook-with-queue"],
)
async def test_a_bad_channel_subscription_is_a_422_and_stores_nothing(
        gateway: Gateway, body: dict[str, Any], field: str) -> None:
    """Bad addresses, pointers, templates, task names and queues, and fields of another channel are refused with
    a problem naming the field, and nothing is stored."""
    problem = assert_problem(await gateway.client.post("/v1/subscriptions", json=body), 422)

    assert problem["errors"] and any(error["field"].startswith(field) for error in problem["errors"])
    assert count_rows(gateway.sessions, Subscription) == 0


async def test_patch_changes_channel_fields_checked_against_the_channel(gateway: Gateway) -> None:
    """PATCH replaces an email subscription's template and recipients and removes reply_to with null; fields of
    another channel, or bad values, are a 422 that changes nothing."""
    created = (await gateway.client.post("/v1/subscriptions", json=email_fields())).json()
    path = f"/v1/subscriptions/{created['id']}"
    template = {"subject": "Shipped {{ data.order_id }}", "text": "On its way."}

    response = await gateway.client.patch(path, json={"template": template, "to": ["ops@example.com"],
                                                      "reply_to": None})
    assert response.status_code == 200, response.text
    assert response.json()["options"] == {"to": ["ops@example.com"], "from": "shop@example.com",
                                          "template": template}
    for change, field in (({"queue": "billing"}, "queue"), ({"to": ["nope"]}, "to"),
                          ({"template": {"subject": "{{", "text": "t"}}, "template.subject")):
        problem = assert_problem(await gateway.client.patch(path, json=change), 422)
        assert any(error["field"].startswith(field) for error in problem["errors"]), problem
    assert (await gateway.client.get(path)).json()["options"] == response.json()["options"]


async def test_patch_with_channel_fields_on_a_webhook_subscription_is_a_422(gateway: Gateway) -> None:
    """A webhook subscription has no channel fields: a PATCH naming one is refused and changes nothing."""
    created = (await gateway.client.post("/v1/subscriptions", json={
        "event_types": ["order.*"], "url": "http://127.0.0.1:8999/hook"})).json()
    problem = assert_problem(await gateway.client.patch(f"/v1/subscriptions/{created['id']}",
                                                        json={"task": "billing.tasks.x"}), 422)

    assert [error["field"] for error in problem["errors"]] == ["task"]
    assert (await gateway.client.get(f"/v1/subscriptions/{created['id']}")).json()["options"] == {}
