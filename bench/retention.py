"""Scheduled work on a big table: cleanup throughput and the router's commit times meanwhile, and the sweep's cost.

    .venv/bin/python -m bench.retention [--events 50000] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

Fills a fresh store (a SQLite file, then a scratch PostgreSQL database when ``--postgres`` is given)
with ``--events`` expired events, each with one finished delivery and two attempts, plus as many
open deliveries for the sweep to read past. Then: one sweep over the table (none is stranded, so it
measures the read), and ``remove_expired`` with the default batch size while a thread commits
router batches (10 events each) through ``persist_events``, timing each commit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import make_engine, make_sessionmaker, migrate, utcnow
from consumers.store.ingest import ActiveSubscription, persist_events
from consumers.store.models import Attempt, Delivery, Event, Subscription
from consumers.store.retention import remove_expired
from consumers.store.sweep import take_stuck
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.settings import Settings

_CHUNK = 5000


def _fill(sessions: sessionmaker[Session], events: int) -> str:
    now, old = utcnow(), utcnow() - timedelta(days=40)
    subscription_id = new_id()
    with sessions.begin() as session:
        session.add(Subscription(id=subscription_id, channel="webhook", event_types=["#"], url="https://example.com",
                                 secret="whsec_x", description="", enabled=True, options={}, created_at=now,
                                 updated_at=now))
    for start in range(0, events, _CHUNK):
        rows = [{"pk": new_id(), "id": new_id(), "source": "bench", "type": "order.created", "body": "{}",
                 "received_at": old} for _ in range(min(_CHUNK, events - start))]
        recent = [{**row, "pk": new_id(), "id": new_id(), "received_at": now} for row in rows]
        finished = [{"id": new_id(), "event_pk": r["pk"], "subscription_id": subscription_id, "status": "succeeded",
                     "attempts_count": 2, "attempts_base": 0, "created_at": old, "updated_at": old} for r in rows]
        open_ = [{**d, "id": new_id(), "event_pk": r["pk"], "status": "pending", "attempts_count": 0,
                  "created_at": now, "updated_at": now} for d, r in zip(finished, recent, strict=True)]
        with sessions.begin() as session:
            session.execute(insert(Event), rows + recent)
            session.execute(insert(Delivery), finished + open_)
            session.execute(insert(Attempt), [{"delivery_id": d["id"], "number": n, "started_at": old,
                                               "duration_ms": 5.0, "status_code": 500 if n == 1 else 200}
                                              for d in finished for n in (1, 2)])
    return subscription_id


def _run(label: str, url: str, events: int) -> None:
    migrate(url)
    engine, router_engine = make_engine(url), make_engine(url)
    sessions, router_sessions = make_sessionmaker(engine), make_sessionmaker(router_engine)
    subscription_id = _fill(sessions, events)
    started = time.perf_counter()
    assert take_stuck(sessions, 300, 1000, ["webhook"]) == {}
    sweep_ms = (time.perf_counter() - started) * 1000
    subscription = ActiveSubscription(subscription_id, "webhook", ("#",), {})
    commits: list[float] = []
    done = threading.Event()

    def router() -> None:
        while not done.is_set():
            batch = [CloudEvent(id=new_id(), source="bench/new", type="order.created", data={}) for _ in range(10)]
            began = time.perf_counter()
            persist_events(router_sessions, [(e, e.to_json()) for e in batch], [subscription])
            commits.append((time.perf_counter() - began) * 1000)

    thread = threading.Thread(target=router)
    thread.start()
    started = time.perf_counter()
    removed = remove_expired(sessions, utcnow() - timedelta(days=30), batch_size=Settings().cleanup_batch_size,
                             task_results=False)
    elapsed = time.perf_counter() - started
    done.set()
    thread.join()
    assert removed.done and removed.events == events
    commits.sort()
    print(f"{label}: sweep read past {events} open deliveries in {sweep_ms:.1f} ms; cleanup removed {removed.events} "
          f"events, {removed.deliveries} deliveries, {removed.attempts} attempts in {elapsed:.2f} s "
          f"({removed.events / elapsed:,.0f} events/s, {removed.batches} transactions); meanwhile {len(commits)} "
          f"router commits, p50 {statistics.median(commits):.1f} ms, p99 {commits[int(len(commits) * 0.99)]:.1f} ms, "
          f"max {commits[-1]:.1f} ms")
    engine.dispose()
    router_engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--postgres", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        _run("sqlite", f"sqlite:///{Path(directory) / 'bench.db'}", args.events)
    if args.postgres:
        name = f"hookgate_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            _run("postgresql", args.postgres.rsplit("/", 1)[0] + f"/{name}", args.events)
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
