"""The real delivery path for API-level tests: the gateway app, a Celery worker, and a way to hand it deliveries.

Usage::

    async with delivery_stack(settings, tmp_path) as stack:     # settings name a migrated store and a vhost
        created = await stack.client.post("/v1/subscriptions", json=...)   # with a `subscriptions` key
        delivery_id = stack.deliver(created.json()["id"], event)   # one pending delivery, sent to the worker
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from consumers.celery_app import make_celery
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, insert_delivery, insert_event, running_gateway
from tests.workers import Worker

__all__ = ["DeliveryStack", "delivery_stack"]


@dataclass(frozen=True)
class DeliveryStack:
    gateway: Gateway
    sender: Celery
    worker: Worker

    @property
    def client(self) -> httpx.AsyncClient:
        """The gateway's client; it sends a key with the ``subscriptions`` scope unless a request names another."""
        return self.gateway.client

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.gateway.sessions

    def deliver(self, subscription_id: str, event: CloudEvent) -> str:
        """Store ``event`` and a pending delivery of it to the subscription, and enqueue it as the router would."""
        event_pk = insert_event(self.sessions, event)
        delivery_id = insert_delivery(self.sessions, event_pk, subscription_id, DeliveryStatus.PENDING)
        self.sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        return delivery_id


@asynccontextmanager
async def delivery_stack(settings: Settings, log_dir: Path,
                         worker_env: Mapping[str, str] | None = None) -> AsyncIterator[DeliveryStack]:
    """Run the gateway and a webhooks worker (with ``worker_env`` added to its environment); stop both afterwards."""
    sender = make_celery(settings)
    try:
        with Worker(settings, log_dir / "worker.log", extra_env=worker_env) as worker:
            async with running_gateway(settings) as gateway:
                gateway.client.headers.update(gateway.auth(Scope.SUBSCRIPTIONS))
                yield DeliveryStack(gateway, sender, worker)
    finally:
        sender.close()
