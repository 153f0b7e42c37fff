"""Test helpers: the real gateway app, lifespan and all, behind an httpx client; keys; problem checks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from kombu import Connection
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette

from consumers.store.database import utcnow
from consumers.store.keys import create_api_key
from consumers.store.models import Attempt, Base, Delivery, Event
from consumers.topology import declare_topology, ingest_queue
from gateway.app import create_app
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.keys import Scope
from schemas.settings import Settings

__all__ = [
    "Gateway",
    "assert_problem",
    "connected_gateway",
    "count_rows",
    "delivery_status",
    "insert_delivery",
    "insert_event",
    "running_gateway",
]


@dataclass
class Gateway:
    """A started app and a client that calls it in-process."""

    app: Starlette
    client: httpx.AsyncClient

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.app.state.sessions

    def key(self, *scopes: Scope) -> str:
        return create_api_key(self.sessions, "test", scopes)[1]

    def auth(self, *scopes: Scope) -> dict[str, str]:
        """An Authorization header for a fresh key with these scopes."""
        return {"Authorization": f"Bearer {self.key(*scopes)}"}


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The app from ``create_app(settings)`` with its lifespan run around the block."""
    app = create_app(settings)
    async with (
        LifespanManager(app, startup_timeout=10, shutdown_timeout=15) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://hookgate.test") as client,
    ):
        yield Gateway(app, client)


@asynccontextmanager
async def connected_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """``running_gateway`` on an empty ingest queue, once its publisher is connected: for tests that read the queue."""
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge(ingest_queue.name)
    async with running_gateway(settings) as gw:
        assert await gw.app.state.publisher.wait_connected(10)
        yield gw


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check ``response`` is an RFC 9457 problem with this status and a detail; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def count_rows(sessions: sessionmaker[Session], model: type[Base]) -> int:
    with sessions() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def insert_event(sessions: sessionmaker[Session], event: CloudEvent) -> str:
    """Store an event row as the router would; returns its primary key."""
    pk = new_id()
    with sessions.begin() as session:
        session.add(
            Event(pk=pk, id=event.id, source=event.source, type=event.type, subject=event.subject, time=event.time,
                  body=event.to_json().decode(), received_at=utcnow())
        )
    return pk


def insert_delivery(
    sessions: sessionmaker[Session],
    event_pk: str,
    subscription_id: str,
    status: DeliveryStatus,
    attempts: Sequence[tuple[int | None, str | None]] = (),
) -> str:
    """Store a delivery and one attempt per ``(status_code, error)``, numbered from 1; returns its id."""
    delivery_id = new_id()
    now = utcnow()
    with sessions.begin() as session:
        session.add(
            Delivery(id=delivery_id, event_pk=event_pk, subscription_id=subscription_id, status=status.value,
                     attempts_count=len(attempts), created_at=now, updated_at=now)
        )
        session.flush()
        for number, (status_code, error) in enumerate(attempts, start=1):
            session.add(
                Attempt(delivery_id=delivery_id, number=number, started_at=now, duration_ms=12.5 * number,
                        status_code=status_code, error=error)
            )
    return delivery_id


def delivery_status(sessions: sessionmaker[Session], delivery_id: str) -> str:
    with sessions() as session:
        return session.execute(select(Delivery.status).where(Delivery.id == delivery_id)).scalar_one()
