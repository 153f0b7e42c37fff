"""Scheduled work beat sends: the stuck-delivery sweep, retention cleanup and the weekly report."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta

import structlog
from celery import Celery, Task
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from consumers.celery_app import celery_app
from consumers.channels import CHANNEL_TASKS
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.errors import StoreError
from consumers.store.reports import weekly_report
from consumers.store.retention import remove_expired
from consumers.store.sweep import take_stuck
from schemas.reports import WeeklyReport
from schemas.settings import Settings

__all__ = ["cleanup_old_data", "generate_weekly_report", "hand_over_report", "sweep_stuck_deliveries"]

logger = structlog.get_logger(__name__)

# Time limits per task (prefork workers enforce them). The sweep runs every minute by default and
# must not pile up; cleanup and the report are heavy-queue work, with the heavy queue's limits.
_SWEEP_LIMITS = {"soft_time_limit": 50, "time_limit": 60}
_HEAVY_LIMITS = {"soft_time_limit": 540, "time_limit": 600}
_REPORT_LIMITS = {"soft_time_limit": 240, "time_limit": 300}
# Cleanup hands over to a follow-up task this long before its soft limit, so it is never cut mid-batch.
_CLEANUP_MARGIN_S = 60
_STORE_RETRY_S = 60
_STORE_RETRIES = 5
_REPORT_DAYS = 7

_engine: tuple[int, Engine, sessionmaker[Session]] | None = None


def _sessions(app: Celery) -> sessionmaker[Session]:
    """This process's sessions on the store, made on first use (an engine may not cross a fork)."""
    global _engine
    if _engine is None or _engine[0] != os.getpid():
        settings: Settings = app.conf.hookgate_settings
        engine = make_engine(settings.database_url)
        _engine = (os.getpid(), engine, make_sessionmaker(engine))
    return _engine[2]


@celery_app.task(name="tasks.sweep_stuck_deliveries", bind=True, acks_late=True, ignore_result=True,
                 track_started=False, **_SWEEP_LIMITS)
def sweep_stuck_deliveries(self: Task) -> dict[str, int]:
    """Enqueue again the open deliveries nothing will send (``consumers.store.sweep``), per channel's task.

    Idempotent: a delivery's claim lets one send through however many tasks name it. A store that is
    down is not retried: the next sweep is the retry.
    """
    settings: Settings = self.app.conf.hookgate_settings
    try:
        taken = take_stuck(_sessions(self.app), settings.sweep_stuck_after_s, settings.sweep_batch_size,
                           CHANNEL_TASKS)
    except StoreError as exc:
        logger.warning("stuck_delivery_sweep_failed", error=str(exc))
        return {}
    for channel, delivery_ids in taken.items():
        task_name, queue = CHANNEL_TASKS[channel]
        for start in range(0, len(delivery_ids), settings.webhook_batch_size):
            self.app.send_task(task_name, args=(delivery_ids[start:start + settings.webhook_batch_size],),
                               queue=queue, ignore_result=True)
        logger.warning("stuck_deliveries_enqueued", channel=channel, deliveries=len(delivery_ids),
                       delivery_ids=delivery_ids[:20])
    return {channel: len(ids) for channel, ids in taken.items()}


@celery_app.task(name="tasks.cleanup_old_data", bind=True, acks_late=True, max_retries=_STORE_RETRIES,
                 **_HEAVY_LIMITS)
def cleanup_old_data(self: Task, cutoff: str | None = None) -> dict[str, int | bool | str]:
    """Remove what is older than ``HOOKGATE_RETENTION_DAYS`` (``consumers.store.retention``), in batches.

    ``cutoff`` (ISO 8601) is set by a follow-up: a run that nears its time limit hands the rest, with
    the same cutoff, to a new task. Idempotent: a second run finds nothing to remove.
    """
    settings: Settings = self.app.conf.hookgate_settings
    moment = datetime.fromisoformat(cutoff) if cutoff else utcnow() - timedelta(days=settings.retention_days)
    structlog.contextvars.bind_contextvars(cutoff=moment.isoformat())
    deadline = time.monotonic() + _HEAVY_LIMITS["soft_time_limit"] - _CLEANUP_MARGIN_S
    try:
        removed = remove_expired(_sessions(self.app), moment, batch_size=settings.cleanup_batch_size,
                                 task_results=not settings.result_backend, deadline=deadline)
    except StoreError as exc:
        logger.warning("cleanup_postponed", error=str(exc))
        raise self.retry(countdown=_STORE_RETRY_S, exc=exc) from exc
    logger.info("old_data_removed", **removed.as_dict())
    if not removed.done:
        follow_up = cleanup_old_data.apply_async(kwargs={"cutoff": moment.isoformat()})
        logger.info("cleanup_continues", follow_up_task_id=follow_up.id)
    return {**removed.as_dict(), "cutoff": moment.isoformat()}


def _start_of_day(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


@celery_app.task(name="tasks.generate_weekly_report", bind=True, acks_late=True, max_retries=_STORE_RETRIES,
                 **_REPORT_LIMITS)
def generate_weekly_report(self: Task, period_end: str | None = None) -> dict[str, str | int]:
    """Compute the report of the seven days before ``period_end`` (default: today 00:00 UTC) and hand it over.

    The period depends on the day only, so a task that runs twice (a redelivery) reports the same
    week under the same ``report_id``.
    """
    settings: Settings = self.app.conf.hookgate_settings
    end = datetime.fromisoformat(period_end) if period_end else _start_of_day(utcnow())
    try:
        report = weekly_report(_sessions(self.app), end - timedelta(days=_REPORT_DAYS), end)
    except StoreError as exc:
        logger.warning("weekly_report_postponed", error=str(exc))
        raise self.retry(countdown=_STORE_RETRY_S, exc=exc) from exc
    structlog.contextvars.bind_contextvars(report_id=report.report_id)
    hand_over_report(report, settings.report_recipients)
    return {"report_id": report.report_id, "period_start": report.period_start.isoformat(),
            "period_end": report.period_end.isoformat(), "subscriptions": len(report.rows),
            "recipients": len(settings.report_recipients)}


def hand_over_report(report: WeeklyReport, recipients: tuple[str, ...]) -> None:
    """Where the rendered report leaves hookgate: to be emailed to ``HOOKGATE_REPORT_RECIPIENTS``.

    NOT WIRED YET: the email channel is built on another branch. Once it is merged, this sends
    ``report.title`` as the subject, ``report.to_text()`` as the body and ``report.to_csv()`` as the
    attachment ``weekly-report.csv`` through it, with ``report.report_id`` as the mail's idempotency
    key. Until then it logs that the report is ready.
    """
    text, table = report.to_text(), report.to_csv()
    logger.info("weekly_report_ready", report_id=report.report_id, subscriptions=len(report.rows),
                recipients=len(recipients), text_bytes=len(text), csv_bytes=len(table))
