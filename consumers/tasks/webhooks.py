"""The webhook channel: ``tasks.deliver_webhook(s)`` sign and POST deliveries and record every attempt."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib.metadata import version
from typing import Any

import orjson
import structlog
from celery import Celery, Task
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
from consumers.ssrf import TargetPolicy, UnsafeTargetError
from consumers.store import deliveries
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.deliveries import AttemptRecord, DeliveryJob, Outcome, SkipReason
from consumers.store.endpoints import EndpointPolicy
from consumers.store.errors import StoreError
from consumers.webhook_client import WebhookClient, WebhookResponse, WebhookTransportError
from schemas.deliveries import DeliveryStatus
from schemas.settings import Settings
from schemas.subscriptions import PayloadFormat

__all__ = ["USER_AGENT", "deliver_webhook", "deliver_webhooks", "recheck_webhooks", "webhook_body"]

logger = structlog.get_logger(__name__)

USER_AGENT = f"hookgate/{version('hookgate')}"
_STORE_RETRY_S = 5
# Attempts the recorder writes in one transaction at most, and how often it tries before giving up.
_RECORD_BATCH = 256
_RECORD_GATHER_S = 0.02
_RECORD_TRIES = 6
_RECHECK_MARGIN_S = 5
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
    """What one worker process sends with: made on first use, since none of it may cross a fork.

    Tasks hand their claimed deliveries to ``pool`` (at most ``webhook_concurrency`` sends at once:
    ``slots``) and return at once; finished attempts queue up in ``finished`` and one recorder thread
    writes them to the store in batches. A slow endpoint thus never keeps the process from its next
    task, and a thousand 100-ms sends a second cost a few dozen transactions, not a thousand.
    """

    pid: int
    app: Celery
    settings: Settings
    policy: EndpointPolicy
    engine: Engine
    sessions: sessionmaker[Session]
    pool: ThreadPoolExecutor
    slots: threading.BoundedSemaphore
    finished: queue.SimpleQueue[tuple[Outcome, int | None] | None]
    local: threading.local
    clients: list[WebhookClient]
    recorder: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = threading.Thread(target=self.record_forever, name="webhook-recorder", daemon=True)
        self.recorder.start()

    def thread_client(self) -> WebhookClient:
        # One client per sending thread: a shared connection pool serialises concurrent sends.
        client: WebhookClient | None = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = _new_client(self.settings)
            self.clients.append(client)
        return client

    def send(self, job: DeliveryJob) -> None:
        """Start one attempt; blocks while the process already has its maximum of sends running."""
        self.slots.acquire()
        self.pool.submit(self._send, job)

    def _send(self, job: DeliveryJob) -> None:
        # A sending thread serves every task of the process, and a pool thread does not inherit the task's
        # context: the delivery's own ids are bound here, for any line written while it is sent.
        with structlog.contextvars.bound_contextvars(**_job_ids(job)):
            try:
                result = _attempt(self.thread_client(), job, self.settings)
            except Exception as exc:  # a send that crashed is a failed attempt, never a lost one
                logger.exception("webhook send failed unexpectedly")
                result = (Outcome(job, AttemptRecord(utcnow(), 0.0, error=f"internal error: {exc}"),
                                  DeliveryStatus.RETRYING, utcnow() + timedelta(seconds=_STORE_RETRY_S)),
                          _STORE_RETRY_S)
            finally:
                self.slots.release()
        self.finished.put(result)

    def record_forever(self) -> None:
        while (first := self.finished.get()) is not None:
            # Sends finish one by one: gathering them for a moment makes one transaction of many.
            batch = [first]
            deadline = time.monotonic() + _RECORD_GATHER_S
            while len(batch) < _RECORD_BATCH and (left := deadline - time.monotonic()) > 0:
                try:
                    item = self.finished.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    self.finished.put(None)
                    break
                batch.append(item)
            self._record_with_retries(batch)

    def _record_with_retries(self, batch: list[tuple[Outcome, int | None]]) -> None:
        for attempt in range(_RECORD_TRIES):
            try:
                _record(self, batch)
                return
            except Exception as exc:  # the store or broker is away: hold the batch, the leases keep it ours
                logger.warning("webhook attempts not recorded yet", attempts=len(batch), error=str(exc),
                               try_number=attempt + 1)
                time.sleep(_STORE_RETRY_S)
        # Given up: the leases run out and the tasks' rechecks send these deliveries again.
        logger.error("webhook attempts not recorded", attempts=len(batch),
                     deliveries=[outcome.job.delivery_id for outcome, _ in batch])

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.finished.put(None)
        self.recorder.join()
        for client in self.clients:
            client.close()
        self.engine.dispose()


_resources: _ProcessResources | None = None


def _job_ids(job: DeliveryJob) -> dict[str, str]:
    return {"delivery_id": job.delivery_id, "event_id": job.event_id, "subscription_id": job.subscription_id}


def _new_client(settings: Settings) -> WebhookClient:
    return WebhookClient(timeout_s=settings.webhook_timeout_s, user_agent=USER_AGENT,
                         policy=TargetPolicy.from_settings(settings))


def _process_resources(app: Celery) -> _ProcessResources:
    global _resources
    if _resources is None or _resources.pid != os.getpid():
        settings: Settings = app.conf.hookgate_settings
        engine = make_engine(settings.database_url)
        _resources = _ProcessResources(
            pid=os.getpid(), app=app, settings=settings,
            policy=EndpointPolicy.from_settings(settings, settings.task_time_limit_s + settings.lease_margin_s),
            engine=engine, sessions=make_sessionmaker(engine),
            pool=ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook-send"),
            slots=threading.BoundedSemaphore(settings.webhook_concurrency), finished=queue.SimpleQueue(),
            local=threading.local(), clients=[],
        )
    return _resources


@worker_process_shutdown.connect
def _close_process_resources(**_: Any) -> None:
    """Let running sends finish and their attempts be recorded before the process exits."""
    global _resources
    if _resources is not None and _resources.pid == os.getpid():
        _resources.close()
    _resources = None


def webhook_body(job: DeliveryJob) -> bytes:
    """The request body in the subscription's payload format.

    Standard Webhooks: ``{"type", "timestamp", "data"}`` of the job's event; binary data the router
    kept as ``data_base64`` travels as such beside an empty ``data``. CloudEvents: the structured
    event exactly as it was routed.
    """
    if job.payload_format == PayloadFormat.CLOUDEVENTS:
        return job.event_body.encode()
    event = orjson.loads(job.event_body)
    payload: dict[str, Any] = {
        "type": job.event_type,
        "timestamp": event.get("time") or job.event_received_at.isoformat(),
        "data": event.get("data"),
    }
    if "data_base64" in event:
        payload["data_base64"] = event["data_base64"]
    return orjson.dumps(payload)


def _signing_secrets(job: DeliveryJob) -> list[str]:
    """The current secret, and the one it replaced while that one's grace period lasts."""
    if job.previous_secret and job.previous_secret_expires_at and job.previous_secret_expires_at > utcnow():
        return [job.secret, job.previous_secret]
    return [job.secret]


def _post(client: WebhookClient, job: DeliveryJob, body: bytes) -> tuple[AttemptRecord, WebhookResponse | None]:
    """Sign and send; raises UnsafeTargetError (nothing sent) when the URL's host may not be called."""
    timestamp = int(time.time())
    headers = {
        "webhook-id": job.delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(_signing_secrets(job), job.delivery_id, timestamp, body),
        "content-type": PayloadFormat(job.payload_format).content_type,
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
    # At least a second: the retry is published before this attempt is recorded, and must find it so.
    countdown = max(1, countdown)
    return Outcome(job, record, DeliveryStatus.RETRYING, utcnow() + timedelta(seconds=countdown)), countdown


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


def _deliver(task: Task, delivery_ids: list[str]) -> None:
    """Claim these deliveries and start their sends; the recorder thread records how they went."""
    # Every line this task writes names its deliveries (task_id and task are bound by celery_app).
    if len(delivery_ids) == 1:
        structlog.contextvars.bind_contextvars(delivery_id=delivery_ids[0])
    else:
        structlog.contextvars.bind_contextvars(delivery_ids=delivery_ids)
    resources = _process_resources(task.app)
    try:
        claim = deliveries.claim_many(resources.sessions, delivery_ids, resources.policy.lease_s, resources.policy)
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
            _skip(resources.sessions, delivery_id, int(resources.policy.lease_s), redelivered)
    for job in claim.jobs:
        resources.send(job)
    if claim.jobs:
        # The task is acked before its sends end. Should this process die before they are recorded,
        # this look after the leases ran out sends them again; otherwise it finds nothing to do.
        recheck_webhooks.apply_async(([job.delivery_id for job in claim.jobs],),
                                     countdown=resources.policy.lease_s + _RECHECK_MARGIN_S)


def _record(resources: _ProcessResources, results: list[tuple[Outcome, int | None]]) -> None:
    """Schedule the retries, record the attempts, log and count them, and act on what settling set off.

    Retries go to the broker before the attempts are committed: once a delivery reads ``retrying``
    its next attempt is already waiting in RabbitMQ. One that arrives for an attempt that was never
    recorded finds the delivery leased and is ignored; the task's recheck sends it.
    """
    for outcome, retry_in_s in results:
        if retry_in_s is not None:
            deliver_webhook.apply_async((outcome.job.delivery_id,), countdown=retry_in_s)
    recorded = deliveries.record_attempts(resources.sessions, [outcome for outcome, _ in results], resources.policy)
    for (outcome, retry_in_s), current in zip(results, recorded.current, strict=True):
        job, record = outcome.job, outcome.record
        _ATTEMPT_SECONDS.observe(record.duration_ms / 1000)
        if current:
            DELIVERIES.labels(channel="webhook", outcome=outcome.status.value).inc()
        # The recorder thread writes the outcomes of many tasks' sends in one batch, so no task_id: the
        # task that claimed a delivery has long returned. Each line names its delivery, event and subscription.
        log = logger.bind(**_job_ids(job), attempt=job.attempt, status_code=record.status_code)
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
    settlement = recorded.settlement
    _enqueue(settlement.release, resources.settings.webhook_batch_size)
    _schedule(settlement.delayed)
    announce(resources.app, resources.sessions, settlement.transitions)


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
    """Make one attempt at one delivery: a retry, a released or deferred delivery, or a manual re-send.

    The store, not Celery's retry counter, decides: ``claim`` lets only one worker send, and the
    attempt number it hands out is checked against the retry schedule. A failure that may pass is
    scheduled again through the broker (delayed delivery) once its attempt is recorded.
    """
    _deliver(self, [delivery_id])


@celery_app.task(name="tasks.deliver_webhooks", bind=True, acks_late=True, max_retries=None, **_OUTCOME_IN_STORE)
def deliver_webhooks(self: Task, delivery_ids: list[str]) -> None:
    """Make one attempt at each of several deliveries: the router's fan-out unit, claimed in one statement."""
    _deliver(self, delivery_ids)


@celery_app.task(name="tasks.recheck_webhooks", bind=True, acks_late=True, max_retries=None, **_OUTCOME_IN_STORE)
def recheck_webhooks(self: Task, delivery_ids: list[str]) -> None:
    """Send those of these deliveries a dead worker left behind: still open, lease run out, and due."""
    resources = _process_resources(self.app)
    try:
        claim = deliveries.claim_many(resources.sessions, delivery_ids, resources.policy.lease_s, resources.policy)
    except StoreError as exc:
        raise self.retry(countdown=_STORE_RETRY_S) from exc
    if claim.jobs:
        logger.warning("webhook deliveries left behind by a worker, sending again",
                       deliveries=[job.delivery_id for job in claim.jobs])
    _HELD.inc(len(claim.held))
    _schedule(claim.deferred)
    for job in claim.jobs:
        resources.send(job)
