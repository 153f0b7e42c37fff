"""The webhook channel: ``tasks.deliver_webhook(s)`` sign and POST deliveries and record every attempt."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
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
from consumers.metrics import ATTEMPT_SECONDS, DELIVERIES, RETRIES_SCHEDULED
from consumers.retry_policy import RetryPolicy, parse_retry_after
from consumers.signing import InvalidSecretError, sign
from consumers.ssrf import UnsafeTargetError, check_target
from consumers.store import deliveries
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.deliveries import AttemptRecord, DeliveryJob, Outcome, SkipReason
from consumers.store.errors import StoreError
from consumers.webhook_client import WebhookClient, WebhookResponse, WebhookTransportError
from schemas.deliveries import DeliveryStatus
from schemas.settings import Settings

__all__ = ["USER_AGENT", "deliver_webhook", "deliver_webhooks", "webhook_body"]

logger = structlog.get_logger(__name__)

USER_AGENT = f"hookgate/{version('hookgate')}"
# The lease must outlive the hard time limit, so no second worker sends while a child may still be sending.
_LEASE_MARGIN_S = 30
_STORE_RETRY_S = 5
# A delivery's outcome lives in the store's attempt log; writing Celery states (STARTED, SUCCESS) to the
# result backend as well cost a second database write per task, ~40 % of a worker's CPU.
_OUTCOME_IN_STORE: dict[str, Any] = {"ignore_result": True, "track_started": False}
_ATTEMPT_SECONDS = ATTEMPT_SECONDS.labels(channel="webhook")
# Answers on which a receiver may ask, with Retry-After, for a later retry.
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_GONE = 410
_RETRIES_SCHEDULED = RETRIES_SCHEDULED.labels(channel="webhook")


@dataclass(slots=True)
class _ProcessResources:
    pid: int
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    client: WebhookClient
    pool: ThreadPoolExecutor
    local: threading.local
    clients: list[WebhookClient]

    def thread_client(self) -> WebhookClient:
        client: WebhookClient | None = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = WebhookClient(timeout_s=self.settings.webhook_timeout_s,
                                                       user_agent=USER_AGENT)
            self.clients.append(client)
        return client


_resources: _ProcessResources | None = None


def _process_resources(settings: Settings) -> _ProcessResources:
    """The engine, HTTP clients and send threads of this process, made on first use: none may cross a fork."""
    global _resources
    if _resources is None or _resources.pid != os.getpid():
        engine = make_engine(settings.database_url)
        client = WebhookClient(timeout_s=settings.webhook_timeout_s, user_agent=USER_AGENT)
        _resources = _ProcessResources(
            pid=os.getpid(), settings=settings, engine=engine, sessions=make_sessionmaker(engine), client=client,
            pool=ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook-send"),
            local=threading.local(), clients=[client],
        )
    return _resources


@worker_process_shutdown.connect
def _close_process_resources(**_: Any) -> None:
    global _resources
    if _resources is not None and _resources.pid == os.getpid():
        _resources.pool.shutdown(wait=True, cancel_futures=True)
        for client in _resources.clients:
            client.close()
        _resources.engine.dispose()
    _resources = None


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


def _attempt(client: WebhookClient, job: DeliveryJob, settings: Settings) -> tuple[Outcome, int | None]:
    """Send one attempt and decide where it leaves the delivery; the int is the retry delay, if any."""
    try:
        check_target(job.url, allow_private=settings.allow_private_targets)
        record, response = _post(client, job, webhook_body(job))
    except (UnsafeTargetError, InvalidSecretError) as exc:
        if not isinstance(exc.__cause__, socket.gaierror):
            return Outcome(job, AttemptRecord(utcnow(), 0.0, error=f"refused: {exc}"), DeliveryStatus.DEAD), None
        # A name that does not resolve may be a passing DNS failure: a failed attempt, retried like one.
        record, response = AttemptRecord(utcnow(), 0.0, error=str(exc)), None
    if response is not None and response.ok:
        return Outcome(job, record, DeliveryStatus.SUCCEEDED), None
    if response is not None and response.status_code == _GONE:
        return Outcome(job, record, DeliveryStatus.DEAD, disable_subscription=True), None
    retry_after = None
    if response is not None and response.status_code in _RETRY_AFTER_STATUSES:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
    policy = RetryPolicy.from_settings(settings).with_schedule(job.retry_schedule)
    countdown = policy.delay_after(job.schedule_attempt, retry_after_s=retry_after)
    if countdown is None:
        return Outcome(job, record, DeliveryStatus.DEAD), None
    return Outcome(job, record, DeliveryStatus.RETRYING, utcnow() + timedelta(seconds=countdown)), countdown


def _send_all(resources: _ProcessResources, jobs: list[DeliveryJob],
              settings: Settings) -> list[tuple[Outcome, int | None]]:
    if len(jobs) == 1 or settings.webhook_concurrency == 1:
        return [_attempt(resources.client, job, settings) for job in jobs]
    # Each thread has its own client: one shared connection pool serialises concurrent sends.
    futures = [resources.pool.submit(lambda j: _attempt(resources.thread_client(), j, settings), job) for job in jobs]
    try:
        return [future.result() for future in futures]
    except SoftTimeLimitExceeded:
        # Attempts still running count as failed; their threads finish on their own.
        late = AttemptRecord(utcnow(), 0.0, error="soft time limit exceeded")
        return [
            future.result() if future.done() and not future.exception()
            else (Outcome(job, late, DeliveryStatus.RETRYING, utcnow() + timedelta(seconds=_STORE_RETRY_S)),
                  _STORE_RETRY_S)
            for job, future in zip(jobs, futures, strict=True)
        ]


def _skip(sessions: sessionmaker[Session], delivery_id: str, lease_s: int, redelivered: bool) -> None:
    reason = deliveries.skip_reason(sessions, delivery_id)
    if reason is SkipReason.SUBSCRIPTION_DELETED:
        deliveries.cancel(sessions, delivery_id, str(reason))
    elif reason is SkipReason.LEASED and redelivered:
        # A redelivered task whose delivery is leased: the worker that held it most likely died
        # mid-send. Look again once its lease has run out, so the delivery is not stranded; if that
        # worker did finish, the second look is a no-op.
        deliver_webhook.apply_async((delivery_id,), countdown=lease_s)
    logger.info("webhook delivery skipped", delivery_id=delivery_id, reason=str(reason))


def _deliver(task: Task, delivery_ids: list[str]) -> list[tuple[Outcome, int | None]]:
    """Claim, send and record these deliveries; returns the retries to schedule (delay in seconds)."""
    settings: Settings = task.app.conf.hookgate_settings
    resources = _process_resources(settings)
    lease_s = settings.task_time_limit_s + _LEASE_MARGIN_S
    try:
        jobs = deliveries.claim_many(resources.sessions, delivery_ids, lease_s)
    except StoreError as exc:
        logger.warning("store unavailable, webhook deliveries postponed", deliveries=len(delivery_ids),
                       error=str(exc))
        raise task.retry(countdown=_STORE_RETRY_S) from exc
    claimed = {job.delivery_id for job in jobs}
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    for delivery_id in delivery_ids:
        if delivery_id not in claimed:
            _skip(resources.sessions, delivery_id, lease_s, redelivered)
    if not jobs:
        return []
    results = _send_all(resources, jobs, settings)
    kept = deliveries.record_attempts(resources.sessions, [outcome for outcome, _ in results])
    retries = []
    for (outcome, retry_in_s), current in zip(results, kept, strict=True):
        job, record = outcome.job, outcome.record
        _ATTEMPT_SECONDS.observe(record.duration_ms / 1000)
        if current:
            DELIVERIES.labels(channel="webhook", outcome=outcome.status.value).inc()
        log = logger.bind(delivery_id=job.delivery_id, event_id=job.event_id, subscription_id=job.subscription_id,
                          attempt=job.attempt, status_code=record.status_code)
        if not current:
            log.info("webhook delivery taken over or cancelled meanwhile; no retry")
        elif outcome.status is DeliveryStatus.SUCCEEDED:
            log.info("webhook delivered", duration_ms=round(record.duration_ms, 1))
        elif outcome.status is DeliveryStatus.DEAD:
            log.warning("webhook delivery dead", error=record.error)
        else:
            log.info("webhook attempt failed, retrying", error=record.error, retry_in_s=retry_in_s)
            _RETRIES_SCHEDULED.inc()
            retries.append((outcome, retry_in_s))
    return retries


@celery_app.task(name="tasks.deliver_webhook", bind=True, acks_late=True, max_retries=None, **_OUTCOME_IN_STORE)
def deliver_webhook(self: Task, delivery_id: str) -> None:
    """Make one attempt at one delivery; a failure that may pass schedules the next through the broker.

    The store, not Celery's retry counter, decides: ``claim`` lets only one worker send, and the
    attempt number it hands out is checked against the retry schedule.
    """
    for _, retry_in_s in _deliver(self, [delivery_id]):
        raise self.retry(countdown=retry_in_s)


@celery_app.task(name="tasks.deliver_webhooks", bind=True, acks_late=True, max_retries=None, **_OUTCOME_IN_STORE)
def deliver_webhooks(self: Task, delivery_ids: list[str]) -> None:
    """Make one attempt at each of several deliveries: the router's fan-out unit.

    One claim and one record transaction for the whole batch, sends in parallel threads; each
    delivery that must try again is retried alone, as ``tasks.deliver_webhook`` with a countdown.
    """
    for outcome, retry_in_s in _deliver(self, delivery_ids):
        deliver_webhook.apply_async((outcome.job.delivery_id,), countdown=retry_in_s)
