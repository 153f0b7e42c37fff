"""Topic patterns match event types exactly as a RabbitMQ topic exchange would."""

from __future__ import annotations

import uuid

import pytest
from kombu import Connection, Exchange, Queue

from consumers.topics import topic_matches


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("order.paid", "order.paid", True),
        ("order.paid", "order.paid.late", False),
        ("order.*", "order.paid", True),
        ("order.*", "order", False),
        ("order.*", "order.paid.late", False),
        ("*.paid", "order.paid", True),
        ("order.#", "order", True),
        ("order.#", "order.paid.late", True),
        ("order.#", "orders.paid", False),
        ("#", "anything.at.all", True),
        ("#.paid", "paid", True),
        ("#.paid", "a.b.paid", True),
        ("#.paid", "a.b.paid.no", False),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.*.z", "a.z", False),
        ("#.#", "a", True),
        ("*.#.*", "a", False),
        ("*.#.*", "a.b", True),
    ],
)
def test_topic_patterns(pattern: str, key: str, expected: bool) -> None:
    """Each pattern matches the routing keys a topic exchange would route to it, and only those."""
    assert topic_matches(pattern, key) is expected


def test_matches_against_a_real_topic_exchange(broker_url: str) -> None:
    """For a set of patterns and keys, the matcher agrees with RabbitMQ itself."""
    patterns = ["order.*", "order.#", "#.paid", "*.*", "a.#.z", "#"]
    keys = ["order", "order.paid", "order.paid.late", "x.paid", "a.z", "a.b.z", "a.b.c"]
    exchange = Exchange(f"t-{uuid.uuid4().hex}", type="topic", auto_delete=True)
    # Confirmed publishes: each message is routed before we read the queues.
    with Connection(broker_url, transport_options={"confirm_publish": True}) as conn:
        channel = conn.channel()
        queues = {p: Queue(f"q-{uuid.uuid4().hex}", exchange, routing_key=p, auto_delete=True)(channel)
                  for p in patterns}
        for q in queues.values():
            q.declare()
        producer = conn.Producer(channel)
        for key in keys:
            producer.publish({"k": key}, exchange=exchange, routing_key=key)
        for pattern, q in queues.items():
            got = set()
            while (message := q.get(no_ack=True)) is not None:
                got.add(message.payload["k"])
            assert got == {k for k in keys if topic_matches(pattern, k)}, pattern
