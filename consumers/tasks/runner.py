"""One delivery, one attempt, on the task's own thread: claim, act, record, retry on the policy (email, custom tasks).

The webhook channel sends many deliveries per task from a thread pool; email and custom tasks are
one delivery per task, so this is the whole life of their attempt in one call::

    claim (conditional UPDATE -> `sending`, leased)  ->  act  ->  publish the retry, if any  ->  record

Errors::

    AttemptFailed        the attempt failed; retried on the retry policy, or dead once it is spent
     +-- PermanentError  the attempt failed for good: the delivery is dead at once, with the reason
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from celery import Celery, Task
from celery.signals import worker_process_shutdown
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from consumers.metrics import ATTEMPT_SECONDS, DELIVERIES, DELIVERY_LATENCY_SECONDS, RETRIES_SCHEDULED
from consumers.retry_policy import RetryPolicy
from consumers.store import deliveries
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.deliveries import AttemptRecord, ChannelJob, Outcome, SkipReason
from consumers.store.errors import StoreError
from schemas.deliveries import DeliveryStatus
from schemas.settings import Settings
from schemas.subscriptions import Channel

__all__ = ["AttemptFailed", "Attempted", "PermanentError", "process_sessions", "run_delivery"]

logger = structlog.get_logger(__name__)

_STORE_RETRY_S = 5
# Recording right after the act keeps the window in which a finished act is not yet known small;
# a store that is away is tried a few times before the lease is left to run out.
_RECORD_TRIES = 4
_RECORD_PAUSE_S = 1.0
_BODY_MAX = 4096


class AttemptFailed(Exception):
    """An attempt that failed; ``status_code`` is the other side's answer (an SMTP reply code), if any."""

    permanent = False

    def __init__(self, detail: str, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code


class PermanentError(AttemptFailed):
    """Raise this from a task to end its delivery ``dead`` at once: trying again will not help."""

    permanent = True


@dataclass(frozen=True, slots=True)
class Attempted:
    """What an attempt that worked reports: the other side's code and answer, kept with the attempt."""

    status_code: int | None = None
    detail: str | None = None


@dataclass(slots=True)
class _Process:
    pid: int
    engine: Engine
    sessions: sessionmaker[Session]


_process: _Process | None = None


def process_sessions(app: Celery) -> sessionmaker[Session]:
    """This worker process's store sessions, made on first use (an engine must not cross a fork)."""
    global _process
    if _process is None or _process.pid != os.getpid():
        settings: Settings = app.conf.hookgate_settings
        engine = make_engine(settings.database_url)
        _process = _Process(os.getpid(), engine, make_sessionmaker(engine))
    return _process.sessions


@worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    global _process
    if _process is not None and _process.pid == os.getpid():
        _process.engine.dispose()
    _process = None


def run_delivery(task: Task, channel: Channel, delivery_id: str, act: Callable[[ChannelJob], Attempted], *,
                 queue: str, time_limit_s: float) -> dict[str, Any]:
    """Make one attempt at a delivery of ``channel`` and record it; the outcome, as the task's result.

    The claim lets one worker act: a second task for the same delivery (enqueued twice, or a retry
    arriving while it is sent) finds it leased and does nothing. Its lease outlives ``time_limit_s``
    (the task's hard limit), so a killed child's delivery is not taken over while it may still run.
    A retry goes to ``queue`` as this task with the same arguments, before the attempt is recorded.
    """
    structlog.contextvars.bind_contextvars(delivery_id=delivery_id)
    settings: Settings = task.app.conf.hookgate_settings
    sessions = process_sessions(task.app)
    lease_s = time_limit_s + settings.lease_margin_s
    try:
        job = deliveries.claim_channel(sessions, delivery_id, channel, lease_s)
    except StoreError as exc:
        logger.warning("store unavailable, delivery postponed", error=str(exc))
        raise task.retry(countdown=_STORE_RETRY_S) from exc
    if job is None:
        return _skip(task, sessions, channel, delivery_id, queue, int(lease_s))
    structlog.contextvars.bind_contextvars(event_id=job.event_id, subscription_id=job.subscription_id,
                                           attempt=job.attempt)
    started_at, started = utcnow(), time.perf_counter()
    retry_in_s: int | None = None
    try:
        report = act(job)
        status = DeliveryStatus.SUCCEEDED
        record = AttemptRecord(started_at, _ms(started), status_code=report.status_code,
                               response_body=(report.detail or "")[:_BODY_MAX] or None)
    except Exception as exc:  # any failure of the act is an attempt that failed, never a lost one
        failed = exc if isinstance(exc, AttemptFailed) else None
        record = AttemptRecord(started_at, _ms(started), status_code=failed.status_code if failed else None,
                               error=(str(exc) if failed else f"{type(exc).__name__}: {exc}")[:_BODY_MAX])
        if failed is None or not failed.permanent:
            policy = RetryPolicy.from_settings(settings).with_schedule(job.retry_schedule)
            retry_in_s = policy.delay_after(job.schedule_attempt)
        status = DeliveryStatus.DEAD if retry_in_s is None else DeliveryStatus.RETRYING
    if retry_in_s is not None:
        # At least a second: the retry is published before this attempt is recorded, and must find it so.
        retry_in_s = max(1, retry_in_s)
        task.apply_async(task.request.args, countdown=retry_in_s, queue=queue)
    next_attempt_at = utcnow() + timedelta(seconds=retry_in_s) if retry_in_s is not None else None
    current = _record(task, Outcome(job, record, status, next_attempt_at), queue, int(lease_s))
    _log_and_count(channel, job, record, status, current, retry_in_s)
    return {"delivery_id": job.delivery_id, "attempt": job.attempt, "status": status.value if current else "superseded",
            "status_code": record.status_code, "error": record.error}


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _record(task: Task, outcome: Outcome, queue: str, lease_s: int) -> bool:
    sessions = process_sessions(task.app)
    for attempt in range(_RECORD_TRIES):
        try:
            return deliveries.record_attempts(sessions, [outcome]).current[0]
        except StoreError as exc:
            logger.warning("attempt not recorded yet", error=str(exc), try_number=attempt + 1)
            time.sleep(_RECORD_PAUSE_S)
    # Given up: once the lease has run out, this look finds the delivery open and tries it again.
    logger.error("attempt not recorded; the delivery is tried again after its lease", outcome=outcome.status.value)
    task.apply_async(task.request.args, countdown=lease_s, queue=queue)
    return False


def _skip(task: Task, sessions: sessionmaker[Session], channel: Channel, delivery_id: str, queue: str,
          lease_s: int) -> dict[str, Any]:
    reason = deliveries.skip_reason(sessions, delivery_id, channel)
    if reason is SkipReason.SUBSCRIPTION_DELETED:
        deliveries.cancel(sessions, delivery_id, str(reason))
    elif reason is SkipReason.SUBSCRIPTION_DISABLED:
        # Parked without a message; enabling the subscription releases it.
        deliveries.hold_disabled(sessions, [delivery_id])
    elif reason is SkipReason.LEASED and (task.request.delivery_info or {}).get("redelivered"):
        # Redelivered while leased: the worker that held it most likely died mid-attempt. Look again
        # once the lease has run out; if that worker did finish, the look is a no-op.
        task.apply_async(task.request.args, countdown=lease_s, queue=queue)
    logger.info("delivery skipped", reason=str(reason))
    return {"delivery_id": delivery_id, "status": "skipped", "reason": str(reason)}


def _log_and_count(channel: Channel, job: ChannelJob, record: AttemptRecord, status: DeliveryStatus,
                   current: bool, retry_in_s: int | None) -> None:
    ATTEMPT_SECONDS.labels(channel=channel.value).observe(record.duration_ms / 1000)
    log = logger.bind(status_code=record.status_code, duration_ms=round(record.duration_ms, 1))
    if not current:
        log.info("delivery taken over or cancelled meanwhile; no retry")
        return
    DELIVERIES.labels(channel=channel.value, outcome=status.value).inc()
    if status is DeliveryStatus.SUCCEEDED:
        DELIVERY_LATENCY_SECONDS.labels(channel=channel.value).observe(
            (utcnow() - job.event_received_at).total_seconds())
        log.info("delivered")
    elif status is DeliveryStatus.DEAD:
        log.warning("delivery dead", error=record.error)
    else:
        RETRIES_SCHEDULED.labels(channel=channel.value).inc()
        log.info("attempt failed, retrying", error=record.error, retry_in_s=retry_in_s)
