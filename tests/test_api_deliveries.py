"""``/v1/deliveries`` and ``/recover``: listing, detail with attempts, and sending finished deliveries again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from kombu import Connection
from sqlalchemy import select, update

from consumers.store.database import utcnow
from consumers.store.models import Attempt, Delivery, Event, Subscription
from consumers.store.subscriptions import create_subscription, delete_subscription
from consumers.topology import task_queue
from schemas import topology
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.keys import Scope
from schemas.settings import Settings
from schemas.subscriptions import SubscriptionCreate
from tests.apiclient import (
    Gateway,
    assert_problem,
    connected_gateway,
    delivery_status,
    insert_delivery,
    insert_event,
)
from tests.receiver import Receiver, make_secret
from tests.seeding import add_subscription, wait_for
from tests.vhosts import fresh_vhost
from tests.workers import Worker


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[Gateway]:
    settings = make_settings(database_url=store_url)
    async with connected_gateway(settings) as gw:
        # The gateway declared the webhooks queue; earlier tests of the module may have left tasks on it.
        with Connection(settings.broker_url) as conn:
            conn.default_channel.queue_purge(topology.WEBHOOKS_QUEUE)
        yield gw


def subscription(gateway: Gateway, event_types: tuple[str, ...] = ("order.#",)) -> str:
    data = SubscriptionCreate(event_types=list(event_types), url="http://127.0.0.1:9/hook")
    return create_subscription(gateway.sessions, data, owner_key_id=None).id


def event(gateway: Gateway, type_: str = "order.created") -> str:
    return insert_event(gateway.sessions, CloudEvent(id=new_id(), source="shop", type=type_, data={"n": 1}))


def queued_task_args(broker_url: str) -> list[list[str]]:
    """The delivery ids of every task waiting on the webhooks queue (taken off it)."""
    found = []
    with Connection(broker_url) as conn, conn.SimpleQueue(task_queue(topology.WEBHOOKS_QUEUE), no_ack=True) as queue:
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                return found
            args, _kwargs, _embed = orjson.loads(message.body)
            found.append(args[0])


async def test_list_filters_and_pages_newest_first(gateway: Gateway) -> None:
    """status, subscription_id, event_type and since filter; pages follow next_before to the end."""
    first, second = subscription(gateway), subscription(gateway)
    created = []
    for _ in range(5):
        created.append(insert_delivery(gateway.sessions, event(gateway), first, DeliveryStatus.DEAD))
        # Ids order by their millisecond; within one, by chance: one millisecond apart, newest first is exact.
        await asyncio.sleep(0.002)
    other_type = insert_delivery(gateway.sessions, event(gateway, "order.paid"), first, DeliveryStatus.SUCCEEDED)
    other_sub = insert_delivery(gateway.sessions, event(gateway), second, DeliveryStatus.DEAD)
    headers = gateway.auth(Scope.EVENTS_READ)

    seen, before = [], None
    while True:
        params = {"status": "dead", "subscription_id": first, "limit": "2", **({"before": before} if before else {})}
        response = await gateway.client.get("/v1/deliveries", params=params, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        assert all("attempts" not in item for item in page["items"])
        seen += [item["id"] for item in page["items"]]
        if (before := page["next_before"]) is None:
            break
    assert seen == created[::-1]

    paid = (await gateway.client.get("/v1/deliveries", params={"event_type": "order.paid"}, headers=headers)).json()
    assert [item["id"] for item in paid["items"]] == [other_type]
    assert paid["items"][0]["event_type"] == "order.paid" and paid["items"][0]["status"] == "succeeded"
    everything = (await gateway.client.get("/v1/deliveries", headers=headers)).json()
    assert {item["id"] for item in everything["items"]} == {*created, other_type, other_sub}
    future = (utcnow() + timedelta(hours=1)).isoformat()
    assert (await gateway.client.get("/v1/deliveries", params={"since": future}, headers=headers)).json()["items"] == []


async def test_list_refuses_bad_filters_and_keys(gateway: Gateway) -> None:
    headers = gateway.auth(Scope.EVENTS_READ)
    for params in ({"status": "lost"}, {"since": "yesterday"}, {"since": "2026-01-01T00:00:00"}, {"limit": "0"},
                   {"colour": "red"}):
        assert_problem(await gateway.client.get("/v1/deliveries", params=params, headers=headers), 422)
    assert_problem(await gateway.client.get("/v1/deliveries"), 401)
    assert_problem(await gateway.client.get("/v1/deliveries", headers=gateway.auth(Scope.EVENTS_WRITE)), 403)


async def test_detail_has_every_attempt_with_response(gateway: Gateway) -> None:
    """Each attempt: status code, duration, response headers and body excerpt, error text."""
    sub = subscription(gateway)
    delivery_id = insert_delivery(gateway.sessions, event(gateway), sub, DeliveryStatus.RETRYING,
                                  [(None, "ConnectError: refused"), (503, "HTTP 503")])
    with gateway.sessions.begin() as session:
        session.execute(update(Attempt).where(Attempt.delivery_id == delivery_id, Attempt.number == 2)
                        .values(response_headers={"retry-after": "2"}, response_body="busy"))
    response = await gateway.client.get(f"/v1/deliveries/{delivery_id}", headers=gateway.auth(Scope.EVENTS_READ))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "retrying" and body["subscription_id"] == sub and body["attempts_count"] == 2
    assert [(a["number"], a["status_code"], a["error"], a["response_headers"], a["response_body"])
            for a in body["attempts"]] == [(1, None, "ConnectError: refused", None, None),
                                           (2, 503, "HTTP 503", {"retry-after": "2"}, "busy")]
    missing = await gateway.client.get("/v1/deliveries/nope", headers=gateway.auth(Scope.EVENTS_READ))
    assert_problem(missing, 404)


async def test_retry_reopens_a_dead_delivery_and_enqueues_it(gateway: Gateway, broker_url: str) -> None:
    """Pending again, the schedule starting over from the attempts made so far, one task on the queue."""
    sub = subscription(gateway)
    delivery_id = insert_delivery(gateway.sessions, event(gateway), sub, DeliveryStatus.DEAD, [(500, "HTTP 500")] * 3)
    response = await gateway.client.post(f"/v1/deliveries/{delivery_id}/retry",
                                          headers=gateway.auth(Scope.SUBSCRIPTIONS))
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"
    with gateway.sessions() as session:
        row = session.execute(select(Delivery).where(Delivery.id == delivery_id)).scalar_one()
    assert (row.status, row.attempts_count, row.attempts_base, row.next_attempt_at) == ("pending", 3, 3, None)
    assert queued_task_args(broker_url) == [[delivery_id]]
    again = await gateway.client.post(f"/v1/deliveries/{delivery_id}/retry", headers=gateway.auth(Scope.SUBSCRIPTIONS))
    assert "still pending" in assert_problem(again, 409)["detail"]
    assert queued_task_args(broker_url) == []


async def test_retry_sends_a_succeeded_delivery_again(make_settings: Callable[..., Settings], store_url: str,
                                                      tmp_path: Path) -> None:
    """A succeeded delivery retried on demand is POSTed again by a worker, with its webhook-id, and succeeds."""
    secret = make_secret()
    # A vhost of its own: the worker's recheck, parked for a lease, would later land on the queue the
    # module's other tests read.
    with fresh_vhost() as broker_url:
        settings = make_settings(database_url=store_url, broker_url=broker_url)
        async with connected_gateway(settings) as gateway:
            with Receiver(secret) as receiver, Worker(settings, tmp_path / "worker.log"):
                sub = add_subscription(gateway.sessions, receiver.url, secret)
                delivery_id = insert_delivery(gateway.sessions, event(gateway), sub, DeliveryStatus.SUCCEEDED,
                                              [(200, None)])
                response = await gateway.client.post(f"/v1/deliveries/{delivery_id}/retry",
                                                      headers=gateway.auth(Scope.SUBSCRIPTIONS))
                assert response.status_code == 202, response.text
                assert response.json()["status"] == "pending"
                (received,) = receiver.wait_for(1)
                wait_for(lambda: delivery_status(gateway.sessions, delivery_id) == "succeeded", 10, "sent again")
            with gateway.sessions() as session:
                attempts = session.execute(select(Attempt.number, Attempt.status_code)
                                           .where(Attempt.delivery_id == delivery_id).order_by(Attempt.number)).all()
    assert received.verified and received.webhook_id == delivery_id
    assert [tuple(a) for a in attempts] == [(1, 200), (2, 200)]


async def test_retry_refusals(gateway: Gateway, broker_url: str) -> None:
    """Unknown 404; open, cancelled, or of a disabled subscription 409; wrong scope 403; nothing enqueued."""
    headers = gateway.auth(Scope.SUBSCRIPTIONS)
    assert_problem(await gateway.client.post("/v1/deliveries/nope/retry", headers=headers), 404)
    sub = subscription(gateway)
    open_one = insert_delivery(gateway.sessions, event(gateway), sub, DeliveryStatus.RETRYING)
    assert_problem(await gateway.client.post(f"/v1/deliveries/{open_one}/retry", headers=headers), 409)
    dead = insert_delivery(gateway.sessions, event(gateway), sub, DeliveryStatus.DEAD)
    assert_problem(await gateway.client.post(f"/v1/deliveries/{dead}/retry",
                                             headers=gateway.auth(Scope.EVENTS_READ)), 403)
    with gateway.sessions.begin() as session:
        session.execute(update(Subscription).where(Subscription.id == sub).values(enabled=False))
    assert "disabled" in assert_problem(await gateway.client.post(f"/v1/deliveries/{dead}/retry", headers=headers),
                                        409)["detail"]
    delete_subscription(gateway.sessions, sub)
    assert "cancelled" in assert_problem(await gateway.client.post(f"/v1/deliveries/{dead}/retry", headers=headers),
                                         409)["detail"]
    assert queued_task_args(broker_url) == []


async def test_recover_reopens_dead_deliveries_since_a_time(gateway: Gateway, broker_url: str) -> None:
    """Only this subscription's dead deliveries of events received since `since`; all enqueued."""
    sub, other = subscription(gateway), subscription(gateway)
    old_event = event(gateway)
    with gateway.sessions.begin() as session:
        session.execute(update(Event).where(Event.pk == old_event).values(received_at=utcnow() - timedelta(days=2)))
    old = insert_delivery(gateway.sessions, old_event, sub, DeliveryStatus.DEAD)
    recent = [insert_delivery(gateway.sessions, event(gateway), sub, DeliveryStatus.DEAD) for _ in range(40)]
    succeeded = insert_delivery(gateway.sessions, event(gateway), sub, DeliveryStatus.SUCCEEDED)
    elsewhere = insert_delivery(gateway.sessions, event(gateway), other, DeliveryStatus.DEAD)
    since = (utcnow() - timedelta(days=1)).isoformat()
    response = await gateway.client.post(f"/v1/subscriptions/{sub}/recover", json={"since": since},
                                         headers=gateway.auth(Scope.SUBSCRIPTIONS))
    assert response.status_code == 202, response.text
    assert response.json() == {"recovered": 40}
    with gateway.sessions() as session:
        statuses = dict(session.execute(select(Delivery.id, Delivery.status)).all())
    assert {statuses[d] for d in recent} == {"pending"}
    assert (statuses[old], statuses[succeeded], statuses[elsewhere]) == ("dead", "succeeded", "dead")
    enqueued = [d for batch in queued_task_args(broker_url) for d in batch]
    assert sorted(enqueued) == sorted(recent)


async def test_recover_refusals(gateway: Gateway) -> None:
    headers = gateway.auth(Scope.SUBSCRIPTIONS)
    assert_problem(await gateway.client.post("/v1/subscriptions/nope/recover", json={"since": utcnow().isoformat()},
                                             headers=headers), 404)
    sub = subscription(gateway)
    for body in ({}, {"since": "2026-01-01T00:00:00"}, {"since": "x"}, {"since": utcnow().isoformat(), "x": 1}):
        assert_problem(await gateway.client.post(f"/v1/subscriptions/{sub}/recover", json=body, headers=headers), 422)
    with gateway.sessions.begin() as session:
        session.execute(update(Subscription).where(Subscription.id == sub).values(enabled=False))
    assert_problem(await gateway.client.post(f"/v1/subscriptions/{sub}/recover", json={"since": utcnow().isoformat()},
                                             headers=headers), 409)
