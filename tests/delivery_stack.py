"""The real delivery path for API-level tests: a migrated store, a Celery worker, and a way to hand it deliveries.

Usage::

    with delivery_stack(settings, tmp_path) as stack:          # settings name the store and the vhost
        ...create a subscription through the gateway on settings.database_url...
        delivery_id = stack.deliver(subscription_id, event)    # one pending delivery, sent to the worker
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from consumers.celery_app import make_celery
from consumers.store.database import make_engine, make_sessionmaker, migrate
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.settings import Settings
from tests.apiclient import insert_delivery, insert_event
from tests.workers import Worker

__all__ = ["DeliveryStack", "delivery_stack"]


@dataclass(frozen=True)
class DeliveryStack:
    sessions: sessionmaker[Session]
    sender: Celery
    worker: Worker

    def deliver(self, subscription_id: str, event: CloudEvent) -> str:
        """Store ``event`` and a pending delivery of it to the subscription, and enqueue it as the router would."""
        event_pk = insert_event(self.sessions, event)
        delivery_id = insert_delivery(self.sessions, event_pk, subscription_id, DeliveryStatus.PENDING)
        self.sender.send_task("tasks.deliver_webhook", args=[delivery_id], queue="webhooks")
        return delivery_id


@contextmanager
def delivery_stack(settings: Settings, log_dir: Path) -> Iterator[DeliveryStack]:
    """Migrate the store, start a webhooks worker, and stop and dispose of everything afterwards."""
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    sender = make_celery(settings)
    try:
        with Worker(settings, log_dir / "worker.log") as worker:
            yield DeliveryStack(make_sessionmaker(engine), sender, worker)
    finally:
        sender.close()
        engine.dispose()
