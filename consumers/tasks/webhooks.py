"""The webhook channel: ``tasks.deliver_webhook`` signs and POSTs one delivery and records the attempt."""

from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import UTC, timedelta
from email.utils import parsedate_to_datetime
from importlib.metadata import version
from typing import Any

import orjson
import structlog
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from consumers.celery_app import celery_app
from consumers.signing import InvalidSecretError, sign
from consumers.ssrf import UnsafeTargetError, check_target
from consumers.store import deliveries
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.deliveries import AttemptRecord, DeliveryJob, SkipReason
from consumers.store.errors import StoreError
from consumers.webhook_client import WebhookClient, WebhookResponse, WebhookTransportError
from schemas.deliveries import DeliveryStatus
from schemas.settings import Settings

__all__ = ["USER_AGENT", "backoff_s", "deliver_webhook", "webhook_body"]

logger = structlog.get_logger(__name__)

USER_AGENT = f"hookgate/{version('hookgate')}"
# The lease must outlive the hard time limit, so no second worker sends while a child may still be sending.
_LEASE_MARGIN_S = 30
_STORE_RETRY_S = 5


@dataclass(frozen=True, slots=True)
class _ProcessResources:
    pid: int
    engine: Engine
    sessions: sessionmaker[Session]
    client: WebhookClient


_resources: _ProcessResources | None = None


def _process_resources(settings: Settings) -> _ProcessResources:
    """The engine and HTTP client of this process, made on first use: sockets must not cross a fork."""
    global _resources
    if _resources is None or _resources.pid != os.getpid():
        engine = make_engine(settings.database_url)
        _resources = _ProcessResources(
            pid=os.getpid(), engine=engine, sessions=make_sessionmaker(engine),
            client=WebhookClient(timeout_s=settings.webhook_timeout_s, user_agent=USER_AGENT),
        )
    return _resources


@worker_process_shutdown.connect
def _close_process_resources(**_: Any) -> None:
    global _resources
    if _resources is not None and _resources.pid == os.getpid():
        _resources.client.close()
        _resources.engine.dispose()
    _resources = None


def backoff_s(attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> int:
    """Seconds to wait after failed ``attempt`` (1-based): base * 2**(attempt - 1) +-20 %, capped.

    Whole seconds, at least one: the broker's delayed delivery counts in seconds.
    """
    # The module's generator, not one of our own: Python reseeds it in each forked child.
    uniform = rng.uniform if rng is not None else random.uniform
    delay = min(base_s * 2 ** (attempt - 1), max_s) * uniform(0.8, 1.2)
    return max(1, round(min(delay, max_s)))


def _retry_after_s(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return (when.astimezone(UTC) - utcnow()).total_seconds() if when.tzinfo else None


def webhook_body(job: DeliveryJob) -> bytes:
    """The Standard Webhooks payload ``{"type", "timestamp", "data"}`` of the job's event.

    Binary data the router kept as ``data_base64`` travels as such beside an empty ``data``.
    """
    event = orjson.loads(job.event_body)
    payload: dict[str, Any] = {
        "type": job.event_type,
        "timestamp": event.get("time") or job.event_received_at.isoformat(),
        "data": event.get("data"),
    }
    if "data_base64" in event:
        payload["data_base64"] = event["data_base64"]
    return orjson.dumps(payload)


def _post(client: WebhookClient, job: DeliveryJob, body: bytes) -> tuple[AttemptRecord, WebhookResponse | None]:
    timestamp = int(time.time())
    headers = {
        "webhook-id": job.delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([job.secret], job.delivery_id, timestamp, body),
        "content-type": "application/json",
    }
    started_at, started = utcnow(), time.perf_counter()
    try:
        response = client.post(job.url, body, headers)
    except (WebhookTransportError, SoftTimeLimitExceeded) as exc:
        error = str(exc) if isinstance(exc, WebhookTransportError) else "soft time limit exceeded"
        return AttemptRecord(started_at, (time.perf_counter() - started) * 1000, error=error), None
    return AttemptRecord(
        started_at,
        (time.perf_counter() - started) * 1000,
        status_code=response.status_code,
        error=None if response.ok else f"HTTP {response.status_code}",
        response_headers=response.headers,
        response_body=response.body_excerpt,
    ), response


def _skip(sessions: sessionmaker[Session], delivery_id: str) -> None:
    reason = deliveries.skip_reason(sessions, delivery_id)
    if reason is SkipReason.SUBSCRIPTION_DELETED:
        deliveries.cancel(sessions, delivery_id, str(reason))
    logger.info("webhook delivery skipped", delivery_id=delivery_id, reason=str(reason))


@celery_app.task(name="tasks.deliver_webhook", bind=True, acks_late=True, ignore_result=True, max_retries=None)
def deliver_webhook(self: Task, delivery_id: str) -> None:
    """Make one attempt at one delivery; a failure that may pass schedules the next through the broker.

    The store, not Celery's retry counter, decides: ``claim`` lets only one worker send, and the
    attempt number it hands out is checked against ``webhook_max_attempts``.
    """
    settings: Settings = self.app.conf.hookgate_settings
    resources = _process_resources(settings)
    try:
        job = deliveries.claim(resources.sessions, delivery_id, settings.task_time_limit_s + _LEASE_MARGIN_S)
    except StoreError as exc:
        logger.warning("store unavailable, webhook delivery postponed", delivery_id=delivery_id, error=str(exc))
        raise self.retry(countdown=_STORE_RETRY_S) from exc
    if job is None:
        _skip(resources.sessions, delivery_id)
        return
    log = logger.bind(delivery_id=job.delivery_id, event_id=job.event_id, subscription_id=job.subscription_id,
                      attempt=job.attempt)

    try:
        check_target(job.url, allow_private=settings.allow_private_targets)
        record, response = _post(resources.client, job, webhook_body(job))
    except (UnsafeTargetError, InvalidSecretError) as exc:
        if not isinstance(exc.__cause__, socket.gaierror):
            deliveries.record_attempt(resources.sessions, job, AttemptRecord(utcnow(), 0.0, error=f"refused: {exc}"),
                                      DeliveryStatus.DEAD)
            log.warning("webhook delivery refused", reason=str(exc))
            return
        # A name that does not resolve may be a passing DNS failure: a failed attempt, retried like one.
        record, response = AttemptRecord(utcnow(), 0.0, error=str(exc)), None

    if response is not None and response.ok:
        deliveries.record_attempt(resources.sessions, job, record, DeliveryStatus.SUCCEEDED)
        log.info("webhook delivered", status_code=record.status_code, duration_ms=round(record.duration_ms, 1))
        return
    if job.attempt >= settings.webhook_max_attempts:
        deliveries.record_attempt(resources.sessions, job, record, DeliveryStatus.DEAD)
        log.warning("webhook delivery dead", status_code=record.status_code, error=record.error)
        return

    countdown = backoff_s(job.attempt, base_s=settings.webhook_backoff_base_s, max_s=settings.webhook_backoff_max_s)
    retry_after = _retry_after_s(response.headers) if response is not None else None
    if retry_after is not None:
        countdown = max(countdown, min(round(retry_after), int(settings.webhook_backoff_max_s)))
    next_attempt_at = utcnow() + timedelta(seconds=countdown)
    if not deliveries.record_attempt(resources.sessions, job, record, DeliveryStatus.RETRYING,
                                     next_attempt_at=next_attempt_at):
        log.info("webhook delivery taken over or cancelled meanwhile; no retry", status_code=record.status_code)
        return
    log.info("webhook attempt failed, retrying", status_code=record.status_code, error=record.error,
             retry_in_s=countdown)
    raise self.retry(countdown=countdown)
