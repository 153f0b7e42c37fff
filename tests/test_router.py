"""The router against real RabbitMQ and both stores: events in over AMQP, deliveries and tasks out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from kombu import Connection, Message, Queue
from sqlalchemy import func, select

from consumers.batches import BATCH_MEDIA_TYPE
from consumers.celery_app import make_celery
from consumers.publisher import ConfirmingPublisher
from consumers.router import Router
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.ingest import load_active_subscriptions, persist_events
from consumers.store.models import Delivery, Event, Subscription
from consumers.topology import dead_queue, declare_topology, task_queue
from schemas import topology
from schemas.events import MAX_BATCH_EVENTS, event_from_json
from schemas.settings import Settings


def _add_subscription(sessions: Any, event_types: list[str], *, enabled: bool = True) -> str:
    now = utcnow()
    sub_id = str(uuid.uuid4())
    with sessions.begin() as session:
        session.add(Subscription(id=sub_id, channel="webhook", event_types=event_types, url="http://127.0.0.1:9/",
                                 secret="whsec_" + "A" * 32, description="", enabled=enabled, options={},
                                 created_at=now, updated_at=now))
    return sub_id


class RouterHarness:
    """A router running in this event loop against the test vhost and store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.publisher = ConfirmingPublisher(
            settings.broker_url, confirm_timeout_s=5, max_batch=256,
            declare=lambda conn: declare_topology(conn), name="test-router",
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RouterHarness:
        await self.publisher.start()
        assert await self.publisher.wait_connected(10)
        router = Router(self.settings, self.sessions, self.publisher, make_celery(self.settings))
        self.task = asyncio.create_task(router.serve(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)
        await self.publisher.close()
        self.engine.dispose()

    def publish(self, body: bytes, routing_key: str, **properties: Any) -> None:
        with Connection(self.settings.broker_url, transport_options={"confirm_publish": True}) as conn:
            conn.Producer().publish(body, exchange=topology.EVENTS_EXCHANGE, routing_key=routing_key,
                                    serializer=None, content_type=properties.pop("content_type", "application/json"),
                                    content_encoding="utf-8", delivery_mode=2, **properties)

    def count(self, model: Any, *where: Any) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.05)


def _drain(broker_url: str, queue: Queue) -> list[Message]:
    messages = []
    with Connection(broker_url) as conn:
        bound = queue(conn.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            messages.append(message)
    return messages


@pytest.fixture
async def router(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[RouterHarness]:
    # Each test starts from empty queues: the vhost is shared by the module.
    settings = make_settings(database_url=store_url, router_batch_wait_s=0.01)
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
    for queue in (topology.INGEST_QUEUE, topology.DEAD_QUEUE, topology.WEBHOOKS_QUEUE):
        with Connection(settings.broker_url) as conn:
            conn.default_channel.queue_purge(queue)
    async with RouterHarness(settings) as harness:
        yield harness


async def test_amqp_publisher_event_becomes_a_delivery_and_a_task(router: RouterHarness) -> None:
    """A plain JSON event published to hookgate.events is stored under its message_id and enqueued once."""
    sub_id = _add_subscription(router.sessions, ["order.*"])
    _add_subscription(router.sessions, ["invoice.#"])
    _add_subscription(router.sessions, ["order.*"], enabled=False)
    router.publish(orjson.dumps({"type": "order.paid", "source": "shop", "data": {"n": 1}}), "order.paid",
                   message_id="evt-1")
    await router.wait_for(lambda: router.count(Delivery) == 1)
    with router.sessions() as session:
        event = session.scalars(select(Event)).one()
        delivery = session.scalars(select(Delivery)).one()
    assert (event.id, event.source, event.type) == ("evt-1", "shop", "order.paid")
    assert orjson.loads(event.body)["data"] == {"n": 1}
    assert delivery.subscription_id == sub_id and delivery.status == "pending"
    # The router publishes the task just after it commits the delivery.
    await router.wait_for(lambda: _peek_task_count(router) >= 1)
    tasks = _drain(router.settings.broker_url, task_queue(topology.WEBHOOKS_QUEUE))
    assert len(tasks) == 1
    assert tasks[0].headers["task"] == "tasks.deliver_webhooks"
    assert orjson.loads(tasks[0].body)[0] == [[delivery.id]]


async def test_cloudevents_amqp_binary_binding(router: RouterHarness) -> None:
    """Attributes in cloudEvents:* application properties and the body as data make one event."""
    _add_subscription(router.sessions, ["#"])
    router.publish(b'{"x": 2}', "user.created", headers={
        "cloudEvents:specversion": "1.0", "cloudEvents:id": "ce-7", "cloudEvents:source": "/users",
        "cloudEvents:type": "user.created", "cloudEvents:traceid": "abc",
    })
    await router.wait_for(lambda: router.count(Delivery) == 1)
    with router.sessions() as session:
        event = session.scalars(select(Event)).one()
    body = orjson.loads(event.body)
    assert (event.id, event.source, body["data"], body["traceid"]) == ("ce-7", "/users", {"x": 2}, "abc")


async def test_duplicates_give_one_event_and_one_delivery(router: RouterHarness) -> None:
    """The same (source, id) published three times is stored once with one delivery per subscription."""
    _add_subscription(router.sessions, ["order.paid"])
    for _ in range(3):
        router.publish(orjson.dumps({"type": "order.paid", "source": "shop", "id": "same"}), "order.paid")
    router.publish(orjson.dumps({"type": "order.paid", "source": "other-shop", "id": "same"}), "order.paid")
    await router.wait_for(lambda: router.count(Event) == 2)
    await asyncio.sleep(0.3)
    assert router.count(Event) == 2
    assert router.count(Delivery) == 2


async def test_redelivery_after_a_crash_between_commit_and_publish_enqueues_the_task(router: RouterHarness) -> None:
    """An event already committed but never enqueued gets its task when its message comes again."""
    _add_subscription(router.sessions, ["order.paid"])
    event = event_from_json({"type": "order.paid", "source": "shop", "id": "crashed"})
    subs = load_active_subscriptions(router.sessions)
    (pending,), _ = persist_events(router.sessions, [(event, event.to_json())], subs)
    router.publish(event.to_json(), "order.paid", content_type="application/cloudevents+json")
    await router.wait_for(lambda: bool(_peek_task_count(router)))
    tasks = _drain(router.settings.broker_url, task_queue(topology.WEBHOOKS_QUEUE))
    assert [orjson.loads(t.body)[0] for t in tasks] == [[[pending.delivery_id]]]
    assert router.count(Delivery) == 1


def _peek_task_count(router: RouterHarness) -> int:
    with Connection(router.settings.broker_url) as conn:
        return conn.default_channel.queue_declare(topology.WEBHOOKS_QUEUE, passive=True).message_count


async def _only_dead_letter(router: RouterHarness, body: bytes, message_id: str) -> str:
    """Once the good event published after it is routed, the one dead letter (this body, this id); its reason."""
    await router.wait_for(lambda: router.count(Delivery) == 1)
    dead: list[Message] = []

    def dead_arrived() -> bool:
        dead.extend(_drain(router.settings.broker_url, dead_queue))
        return bool(dead)

    await router.wait_for(dead_arrived)
    assert len(dead) == 1
    assert dead[0].body == body and dead[0].properties["message_id"] == message_id
    assert router.count(Event) == 1
    return str(dead[0].headers[topology.ERROR_HEADER])


@pytest.mark.parametrize(
    ("body", "routing_key", "reason"),
    [
        (b"\xff not json", "x.y", "not JSON"),
        (b'{"source": "s", "data": 1}', "x.y", "type"),
        (b'{"type": 5, "source": "s"}', "x.y", "type"),
        (b'["a", "list"]', "x.y", "JSON object"),
        (b'{"type": "x.y", "source": "s", "data": "' + b"a" * 300_000 + b'"}', "x.y", "over the limit"),
    ],
)
async def test_garbage_is_dead_lettered_with_its_reason(router: RouterHarness, body: bytes, routing_key: str,
                                                        reason: str) -> None:
    """A message that is not an event lands in hookgate.dead with the reason in a header; the router goes on."""
    _add_subscription(router.sessions, ["#"])
    router.publish(body, routing_key, message_id="bad-1")
    router.publish(orjson.dumps({"type": "ok.after", "source": "s"}), "ok.after")
    assert reason in await _only_dead_letter(router, body, "bad-1")


async def test_deliveries_are_enqueued_in_batches(make_settings: Callable[..., Settings], store_url: str) -> None:
    """Many deliveries routed together go out as tasks of at most webhook_batch_size delivery ids each."""
    settings = make_settings(database_url=store_url, router_batch_wait_s=0.2, webhook_batch_size=4)
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge(topology.WEBHOOKS_QUEUE)
    async with RouterHarness(settings) as router:
        for _ in range(5):
            _add_subscription(router.sessions, ["order.paid"])
        router.publish(orjson.dumps({"type": "order.paid", "source": "shop", "id": "fan-out"}), "order.paid")
        await router.wait_for(lambda: _peek_task_count(router) >= 2)
        tasks = _drain(settings.broker_url, task_queue(topology.WEBHOOKS_QUEUE))
        with router.sessions() as session:
            delivery_ids = set(session.scalars(select(Delivery.id)))
    batches = [orjson.loads(t.body)[0][0] for t in tasks]
    assert sorted(len(b) for b in batches) == [1, 4]
    assert len(delivery_ids) == 5 and delivery_ids == {i for b in batches for i in b}


async def test_a_batch_message_is_each_of_its_events_stored_once_and_routed(router: RouterHarness) -> None:
    """A cloudevents-batch message gives one event per element, deduplicated on (source, id), ids from the message."""
    _add_subscription(router.sessions, ["order.*"])
    already = event_from_json({"type": "order.paid", "source": "shop", "id": "stored-before"})
    persist_events(router.sessions, [(already, already.to_json())], [])
    batch = [{"specversion": "1.0", "type": "order.paid", "source": "shop", "id": "b-1", "data": {"n": 1}},
             {"type": "order.paid", "source": "shop", "data": {"n": 2}},
             {"type": "order.paid", "source": "shop", "id": "b-1"},
             {"type": "order.shipped", "source": "shop", "id": "stored-before"},
             {"type": "order.shipped", "id": "b-4"}]
    router.publish(orjson.dumps(batch), "order.paid", content_type=BATCH_MEDIA_TYPE, message_id="m-7")
    await router.wait_for(lambda: router.count(Event) == 4)
    with router.sessions() as session:
        stored = {(e.source, e.id): orjson.loads(e.body)["data"] for e in session.scalars(select(Event))}
    assert stored == {("shop", "b-1"): {"n": 1}, ("shop", "m-7:1"): {"n": 2}, ("shop", "stored-before"): None,
                      ("urn:hookgate:amqp", "b-4"): None}
    # The three new events match the subscription; the one stored before routing is not routed again.
    assert router.count(Delivery) == 3
    assert not _drain(router.settings.broker_url, dead_queue)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"type": "x.y", "source": "s"}', "non-empty JSON array"),
        (b"[]", "non-empty JSON array"),
        (b"[{\"type\": \"x.y\", \"source\": \"s\"}, ", "not JSON"),
        (b'[{"type": "x.y", "source": "s", "id": "ok"}, {"type": "has space", "source": "s"}]', "event 1 of the batch"),
        (b'[{"type": "x.y", "source": "s", "id": "ok"}, 5]', "event 1 of the batch: an event must be a JSON object"),
        (b'[{"type": "x.y", "source": "s", "data": "' + b"a" * 300_000 + b'"}]', "over the limit"),
        (orjson.dumps([{"type": "x.y", "source": "s"}] * (MAX_BATCH_EVENTS + 1)), "at most 1000 events"),
    ],
)
async def test_a_malformed_batch_is_dead_lettered_whole_with_its_reason(router: RouterHarness, body: bytes,
                                                                        reason: str) -> None:
    """A batch with any bad element stores none of its events and lands whole in hookgate.dead with the reason."""
    _add_subscription(router.sessions, ["#"])
    router.publish(body, "x.y", content_type=BATCH_MEDIA_TYPE, message_id="bad-batch")
    router.publish(orjson.dumps([{"type": "ok.after", "source": "s", "id": "after"}]), "ok.after",
                   content_type=BATCH_MEDIA_TYPE)
    assert reason in await _only_dead_letter(router, body, "bad-batch")
