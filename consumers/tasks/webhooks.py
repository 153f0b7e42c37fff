"""The webhook channel: ``tasks.deliver_webhook(s)`` sign and POST deliveries and record every attempt."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib.metadata import version
from typing import Any

import orjson
import structlog
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from consumers.announce import announce
from consumers.celery_app import celery_app
from consumers.metrics import (
    ATTEMPT_SECONDS,
    DELIVERIES,
    DELIVERIES_DEFERRED,
    DELIVERIES_HELD,
    DELIVERY_LATENCY_SECONDS,
    RETRIES_SCHEDULED,
)
from consumers.retry_policy import RetryPolicy, parse_retry_after
from consumers.signing import InvalidSecretError, sign
from consumers.ssrf import UnsafeTargetError, check_target
from consumers.store import deliveries
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.deliveries import AttemptRecord, DeliveryJob, Outcome, SkipReason
from consumers.store.endpoints import EndpointPolicy
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
_LATENCY = DELIVERY_LATENCY_SECONDS.labels(channel="webhook")
_HELD = DELIVERIES_HELD.labels(channel="webhook")
_DEFERRED = DELIVERIES_DEFERRED.labels(channel="webhook")


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
    except WebhookTransportError as exc:
        return AttemptRecord(started_at, (time.perf_counter() - started) * 1000, error=str(exc)), None
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
    if job.send_at is not None:
        time.sleep(max(0.0, (job.send_at - utcnow()).total_seconds()))
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


def _send_all(resources: _ProcessResources, jobs: list[DeliveryJob], settings: Settings,
              ) -> tuple[list[tuple[Outcome, int | None]], list[Future[tuple[Outcome, int | None]]]]:
    """Send on the process's threads; the attempts done within the patience, and those still running.

    A task does not wait for a slow endpoint: what is still running after ``webhook_patience_s`` (or
    at the soft time limit) finishes on its thread and records itself, while the task returns and
    its worker takes the next. The delivery's lease keeps every other worker off it meanwhile.
    """
    # Each thread has its own client: one shared connection pool serialises concurrent sends.
    futures = [resources.pool.submit(lambda j: _attempt(resources.thread_client(), j, settings), job) for job in jobs]
    with contextlib.suppress(SoftTimeLimitExceeded):
        wait(futures, timeout=settings.webhook_patience_s)
    done: list[tuple[Outcome, int | None]] = []
    running: list[Future[tuple[Outcome, int | None]]] = []
    for future in futures:
        if future.done():
            done.append(future.result())
        else:
            running.append(future)
    return done, running


def _skip(sessions: sessionmaker[Session], delivery_id: str, lease_s: int, redelivered: bool) -> None:
    reason = deliveries.skip_reason(sessions, delivery_id)
    if reason is SkipReason.SUBSCRIPTION_DELETED:
        deliveries.cancel(sessions, delivery_id, str(reason))
    elif reason is SkipReason.SUBSCRIPTION_DISABLED:
        # Parked without a message; enabling the subscription releases it.
        deliveries.hold_disabled(sessions, [delivery_id])
        _HELD.inc()
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
    policy = EndpointPolicy.from_settings(settings, lease_s)
    try:
        claim = deliveries.claim_many(resources.sessions, delivery_ids, lease_s, policy)
    except StoreError as exc:
        logger.warning("store unavailable, webhook deliveries postponed", deliveries=len(delivery_ids),
                       error=str(exc))
        raise task.retry(countdown=_STORE_RETRY_S) from exc
    _HELD.inc(len(claim.held))
    logger.debug("webhook deliveries claimed", sending=[(j.delivery_id, j.send_at) for j in claim.jobs],
                 held=claim.held, deferred=claim.deferred)
    _schedule(claim.deferred)
    taken = {job.delivery_id for job in claim.jobs} | set(claim.held) | {i for i, _ in claim.deferred}
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    for delivery_id in delivery_ids:
        if delivery_id not in taken:
            _skip(resources.sessions, delivery_id, lease_s, redelivered)
    if not claim.jobs:
        return []
    results, running = _send_all(resources, claim.jobs, settings)
    for future in running:
        future.add_done_callback(lambda f: _record_late(task.app, resources, f, policy))
    return _record(task.app, resources, results, policy)


def _record_late(app: Celery, resources: _ProcessResources, future: Future[tuple[Outcome, int | None]],
                 policy: EndpointPolicy) -> None:
    """Record an attempt that outlived its task, and schedule its retry; on the sending thread."""
    try:
        for outcome, retry_in_s in _record(app, resources, [future.result()], policy):
            deliver_webhook.apply_async((outcome.job.delivery_id,), countdown=retry_in_s)
    except Exception as exc:  # the lease runs out and the stuck-delivery sweep sends it again
        logger.error("late webhook attempt not recorded", error=str(exc))


def _record(app: Celery, resources: _ProcessResources, results: list[tuple[Outcome, int | None]],
            policy: EndpointPolicy) -> list[tuple[Outcome, int | None]]:
    """Record attempts, log and count them, and act on what settling them set off; returns the retries."""
    if not results:
        return []
    settings: Settings = app.conf.hookgate_settings
    recorded = deliveries.record_attempts(resources.sessions, [outcome for outcome, _ in results], policy)
    retries = []
    for (outcome, retry_in_s), current in zip(results, recorded.current, strict=True):
        job, record = outcome.job, outcome.record
        _ATTEMPT_SECONDS.observe(record.duration_ms / 1000)
        if current:
            DELIVERIES.labels(channel="webhook", outcome=outcome.status.value).inc()
        log = logger.bind(delivery_id=job.delivery_id, event_id=job.event_id, subscription_id=job.subscription_id,
                          attempt=job.attempt, status_code=record.status_code)
        if not current:
            log.info("webhook delivery taken over or cancelled meanwhile; no retry")
        elif outcome.status is DeliveryStatus.SUCCEEDED:
            _LATENCY.observe((utcnow() - job.event_received_at).total_seconds())
            log.info("webhook delivered", duration_ms=round(record.duration_ms, 1))
        elif outcome.status is DeliveryStatus.DEAD:
            log.warning("webhook delivery dead", error=record.error)
        else:
            log.info("webhook attempt failed, retrying", error=record.error, retry_in_s=retry_in_s)
            _RETRIES_SCHEDULED.inc()
            retries.append((outcome, retry_in_s))
    settlement = recorded.settlement
    _enqueue(settlement.release, settings.webhook_batch_size)
    _schedule(settlement.delayed)
    announce(app, settlement.transitions)
    return retries


def _enqueue(delivery_ids: list[str], batch_size: int) -> None:
    for start in range(0, len(delivery_ids), batch_size):
        deliver_webhooks.apply_async((delivery_ids[start:start + batch_size],))


def _schedule(delayed: list[tuple[str, datetime]]) -> None:
    """Send deliveries the endpoint deferred (a rate slot, a probe's time) to come back then."""
    _DEFERRED.inc(len(delayed))
    for delivery_id, due in delayed:
        # The broker's delayed delivery takes one second at least.
        deliver_webhook.apply_async((delivery_id,), countdown=max(1.0, (due - utcnow()).total_seconds()))


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
