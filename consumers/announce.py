"""hookgate's own events about its endpoints, published on ``hookgate.events`` like any other event.

Operators subscribe to ``hookgate.subscription.*`` (by webhook or email) to hear that an endpoint
was paused by its circuit breaker, resumed, or disabled.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from consumers.metrics import ENDPOINT_PAUSED, ENDPOINT_TRANSITIONS
from consumers.store.database import utcnow
from consumers.store.endpoints import Transition, TransitionKind
from consumers.store.ingest import load_active_subscriptions, persist_events
from schemas import topology
from schemas.events import CloudEvent
from schemas.ids import new_id

__all__ = ["SOURCE", "announce"]

log = structlog.get_logger(__name__)

SOURCE = "hookgate"


def announce(celery: Celery, sessions: sessionmaker[Session], transitions: Sequence[Transition]) -> None:
    """Publish one event per transition (confirmed, with kombu's retries); never raises.

    The transition itself is already committed: the event only tells about it. An event the broker
    does not take is written to the store as the router would have written it (``_keep``).
    """
    for transition in transitions:
        ENDPOINT_TRANSITIONS.labels(transition=transition.kind.value).inc()
        if transition.kind is not TransitionKind.DISABLED:
            ENDPOINT_PAUSED.labels(subscription_id=transition.subscription_id).set(
                1 if transition.kind is TransitionKind.PAUSED else 0)
        event = CloudEvent(
            id=new_id(), source=SOURCE, type=f"hookgate.subscription.{transition.kind.value}", time=utcnow(),
            subject=transition.subscription_id,
            data={"subscription_id": transition.subscription_id, "reason": transition.reason},
        )
        log.warning("endpoint " + transition.kind.value, subscription_id=transition.subscription_id,
                    reason=transition.reason, event_id=event.id)
        try:
            with celery.producer_or_acquire() as producer:
                producer.publish(
                    event.to_json(), exchange=topology.EVENTS_EXCHANGE, routing_key=event.type, serializer=None,
                    content_type="application/cloudevents+json", content_encoding="utf-8", delivery_mode=2,
                    message_id=event.id, retry=True, retry_policy={"max_retries": 3},
                )
        except Exception as exc:  # whatever kombu or the AMQP client raised: the broker did not take it
            log.warning("endpoint event not published, kept in the store", event_type=event.type,
                        subscription_id=transition.subscription_id, error=str(exc))
            _keep(sessions, event)


def _keep(sessions: sessionmaker[Session], event: CloudEvent) -> None:
    """Store the event with a pending delivery per matching subscription; the stuck-delivery sweep sends them.

    The store, not a retry loop in this process: the transition was committed there a moment ago,
    so it is up, and a row outlives this process, which a retry in memory does not. A publish that
    did land unconfirmed costs nothing: the router finds the event stored, (source, id) a duplicate.
    """
    try:
        persist_events(sessions, [(event, event.to_json())], load_active_subscriptions(sessions))
    except Exception as exc:  # whatever the database driver raised: broker and store both away
        # The class only: a driver's message may quote statement parameters.
        log.error("endpoint event lost", event_type=event.type, event_id=event.id, error=type(exc).__name__)
