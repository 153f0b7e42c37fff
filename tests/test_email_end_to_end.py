"""Email end to end: `hookgate serve`, `router` and `worker -Q email` to a real aiosmtpd server, both stores."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from schemas.ids import new_id
from schemas.settings import Settings
from tests.channel_seeding import email_fields
from tests.channel_stack import ChannelStack
from tests.smtpserver import SmtpSink


@pytest.fixture(scope="module")
def smtp(module_store_url: str) -> Iterator[SmtpSink]:
    """A server per store: each store's run counts its own messages."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def stack(broker_url: str, module_store_url: str, smtp: SmtpSink,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChannelStack]:
    settings = Settings(broker_url=broker_url, database_url=module_store_url, retry_schedule=(0, 1, 1),
                        subscription_cache_ttl_s=0.2, router_batch_wait_s=0.01, smtp_host="127.0.0.1",
                        smtp_port=smtp.port)  # type: ignore[arg-type]
    with ChannelStack(settings, tmp_path_factory.mktemp("email"), workers={"email": "email"}) as running:
        yield running


def _deliveries(stack: ChannelStack, event_id: str, count: int, status: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        found = stack.api.get(f"/v1/events/{event_id}", params={"source": "shop"}).json()
        deliveries = found.get("deliveries", []) if isinstance(found, dict) else []
        if len(deliveries) == count and all(d["status"] == status for d in deliveries):
            return list(deliveries)
        if time.monotonic() > deadline:
            raise AssertionError(f"event {event_id}: {found}\n{stack.logs()}")
        time.sleep(0.1)


def test_events_from_http_and_amqp_become_one_email_per_subscription_and_recipient(
        stack: ChannelStack, smtp: SmtpSink) -> None:
    """An order.paid event POSTed and one published to RabbitMQ each send one email per matching subscription to
    the customer the event names; an event of another type sends nothing, and the deliveries API lists them."""
    for fields in (email_fields(event_types=["order.paid"]),
                   email_fields(event_types=["order.*"], to=["ops@example.com"], template={
                       "subject": "[ops] {{ type }} {{ data.order_id }}", "text": "{{ data | tojson }}"})):
        response = stack.api.post("/v1/subscriptions", json=fields)
        assert response.status_code == 201, response.text
    stack.wait_for_subscriptions()

    posted = stack.api.post("/v1/events", json={
        "type": "order.paid", "source": "shop", "data": {"order_id": 1, "customer": {"email": "ada@example.com",
                                                                                      "name": "Ada"}}})
    assert posted.status_code == 202, posted.text
    published = f"amqp-{new_id()}"
    stack.publish_amqp({"type": "order.paid", "source": "shop",
                        "data": {"order_id": 2, "customer": {"email": "bob@example.com", "name": "Bob"}}},
                       message_id=published)
    refunded = stack.api.post("/v1/events", json={"type": "order.refunded", "source": "shop", "data": {
        "order_id": 3, "customer": {"email": "carol@example.com", "name": "Carol"}}}).json()["id"]

    for event_id in (posted.json()["id"], published):
        _deliveries(stack, event_id, 2, "succeeded")
    _deliveries(stack, refunded, 1, "succeeded")
    time.sleep(0.5)  # anything extra would arrive now

    assert [m["Subject"] for m in smtp.messages_to("ada@example.com")] == ["Order 1 paid"]
    assert [m["Subject"] for m in smtp.messages_to("bob@example.com")] == ["Order 2 paid"]
    assert smtp.messages_to("carol@example.com") == []
    assert sorted(m["Subject"] for m in smtp.messages_to("ops@example.com")) == [
        "[ops] order.paid 1", "[ops] order.paid 2", "[ops] order.refunded 3"]
    listed = stack.api.get("/v1/deliveries", params={"status": "succeeded"}).json()["items"]
    assert len(listed) == 5


def test_a_dead_email_is_sent_again_by_the_retry_route(stack: ChannelStack, smtp: SmtpSink) -> None:
    """An email refused with 550 is dead; POST /v1/deliveries/{id}/retry sends it again through the email queue."""
    response = stack.api.post("/v1/subscriptions", json=email_fields(event_types=["invoice.sent"],
                                                                     to=["retry@example.com"]))
    assert response.status_code == 201, response.text
    stack.wait_for_subscriptions()
    smtp.script("550 5.7.1 Message rejected")
    event_id = stack.api.post("/v1/events", json={"type": "invoice.sent", "source": "shop",
                                                  "data": {"order_id": 9, "customer": {"name": "Dan"}}}).json()["id"]
    (dead,) = _deliveries(stack, event_id, 1, "dead")
    assert "550 5.7.1 Message rejected" in dead["last_error"]

    assert stack.api.post(f"/v1/deliveries/{dead['id']}/retry").status_code == 202
    (sent,) = _deliveries(stack, event_id, 1, "succeeded")

    assert sent["attempts_count"] == 2
    assert [m["Subject"] for m in smtp.messages_to("retry@example.com")] == ["Order 9 paid"]
