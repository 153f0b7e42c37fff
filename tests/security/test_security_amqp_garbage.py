"""Garbage on the AMQP side, at scale, through a real ``hookgate router``: dead-lettered with a reason."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import orjson
from kombu import Connection
from sqlalchemy import func, select

from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.models import Event
from consumers.topology import declare_topology
from schemas import topology
from schemas.settings import Settings
from tests.workers import Hookgate, wait_until

_GOOD = 1500
_MAX_BODY = 16 * 1024


def _garbage(n: int) -> tuple[str, bytes, dict[str, object], str | None]:
    """The n-th bad message: (kind, body, headers, content type), cycling through every kind of wrong."""
    kinds: list[tuple[str, bytes, dict[str, object], str | None]] = [
        ("not json", os.urandom(64), {}, "application/json"),
        ("truncated json", b'{"type": "order.paid", "source": ', {}, "application/json"),
        ("json array", b"[1, 2, 3]", {}, "application/json"),
        ("json scalar", b"42", {}, None),
        ("null", b"null", {}, "application/json"),
        ("missing type", orjson.dumps({"source": "erp", "data": n}), {}, "application/json"),
        ("type not a string", orjson.dumps({"type": 5, "source": "erp"}), {}, "application/json"),
        ("source a list", orjson.dumps({"type": "order.paid", "source": ["erp"]}), {}, "application/json"),
        ("type with a wildcard", orjson.dumps({"type": "order.*", "source": "erp"}), {}, "application/json"),
        ("unknown field", orjson.dumps({"type": "a", "source": "erp", "colour": "red"}), {}, "application/json"),
        ("huge body", b'{"type": "a", "source": "b", "data": "' + b"x" * (_MAX_BODY + 1) + b'"}', {}, None),
        ("bad specversion", b"{}", {"cloudEvents:specversion": "0.3", "cloudEvents:type": "a",
                                     "cloudEvents:source": "b", "cloudEvents:id": f"x{n}"}, "application/json"),
        ("binary without type", b"{}", {"cloudEvents:specversion": "1.0", "cloudEvents:source": "b"}, None),
        ("invalid utf-8", b'{"type": "a", "source": "\xff\xfe"}', {}, "application/json"),
        ("time not a time", orjson.dumps({"type": "a", "source": "b", "time": "yesterday"}), {}, None),
    ]
    return kinds[n % len(kinds)]


def test_thousands_of_bad_messages_among_good_ones(broker_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """Every bad message lands in hookgate.dead with its reason; every good one is stored; the router lives on."""
    settings = Settings(broker_url=broker_url, database_url=sqlite_url, max_body_bytes=_MAX_BODY, log_format="json",
                        router_batch_wait_s=0.01)
    with Connection(broker_url, transport_options={"confirm_publish": True}) as conn:
        declare_topology(conn)
        for queue in (topology.INGEST_QUEUE, topology.DEAD_QUEUE):
            conn.default_channel.queue_purge(queue)
    messages = [("good", orjson.dumps({"type": "order.paid", "source": "erp", "data": {"n": n}}), {},
                 "application/json", f"good-{n}") for n in range(_GOOD)]
    messages += [(*_garbage(n), f"bad-{n}") for n in range(2 * _GOOD)]
    random.Random(7).shuffle(messages)
    bad = {message_id: kind for kind, _, _, _, message_id in messages if kind != "good"}

    router = Hookgate(settings, tmp_path / "router.log", "router").start()
    try:
        with Connection(broker_url, transport_options={"confirm_publish": True}) as conn:
            producer = conn.Producer()
            for kind, body, headers, content_type, message_id in messages:
                producer.publish(body, exchange=topology.EVENTS_EXCHANGE, routing_key=kind.replace(" ", "-"),
                                 headers=headers, content_type=content_type, content_encoding="binary",
                                 message_id=message_id, delivery_mode=2)

        engine = make_engine(sqlite_url)
        sessions = make_sessionmaker(engine)
        try:
            def stored() -> int:
                with sessions() as session:
                    return session.execute(select(func.count()).select_from(Event)).scalar_one()

            def dead_count() -> int:
                with Connection(broker_url) as conn:
                    return conn.default_channel.queue_declare(topology.DEAD_QUEUE, passive=True).message_count

            wait_until(lambda: stored() == _GOOD and dead_count() == len(bad), "every message routed or dead-lettered",
                       timeout_s=90, interval_s=0.2)
            assert router.running, "the router died"
            with sessions() as session:
                assert set(session.execute(select(Event.id)).scalars()) == {f"good-{n}" for n in range(_GOOD)}
        finally:
            engine.dispose()

        reasons: Counter[str] = Counter()
        with Connection(broker_url) as conn:
            channel = conn.default_channel
            seen: set[str] = set()
            while (message := channel.basic_get(topology.DEAD_QUEUE, no_ack=True)) is not None:
                message_id = message.properties["message_id"]
                reason = message.headers.get(topology.ERROR_HEADER)
                assert reason, f"{message_id} ({bad.get(message_id)}) was dead-lettered without a reason"
                seen.add(message_id)
                reasons[bad[message_id]] += 1
        assert seen == set(bad)
        print(f"\n[security] {len(bad)} bad messages dead-lettered with a reason among {_GOOD} good events stored; "
              f"by kind: {dict(reasons)}")
        assert router.running
    except BaseException:
        print(router.log_text()[-3000:])
        raise
    finally:
        router.stop()
