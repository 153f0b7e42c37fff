"""Scheduled work beat sends: the stuck-delivery sweep, retention cleanup and the weekly report."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from email.message import EmailMessage

import structlog
from celery import Celery, Task
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from consumers.celery_app import celery_app
from consumers.channels import task_calls
from consumers.smtp import SmtpPermanentError, SmtpTransientError, send_message
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.errors import StoreError
from consumers.store.ingest import pending_deliveries
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
def sweep_stuck_deliveries(self: Task) -> int:
    """Enqueue again the open deliveries nothing will send (``consumers.store.sweep``), each on its channel's task.

    Idempotent: a delivery's claim lets one send through however many tasks name it. A store that is
    down is not retried: the next sweep is the retry.
    """
    settings: Settings = self.app.conf.hookgate_settings
    try:
        taken = take_stuck(_sessions(self.app), settings.sweep_stuck_after_s, settings.sweep_batch_size)
        pending = pending_deliveries(_sessions(self.app), taken) if taken else []
    except StoreError as exc:
        logger.warning("stuck_delivery_sweep_failed", error=str(exc))
        return 0
    for route, args in task_calls(pending, settings.webhook_batch_size):
        # A custom route's queue is declared on the way (Celery creates missing queues like ours).
        self.app.send_task(route.task, args=args, queue=route.queue, ignore_result=not route.with_event_id)
    if taken:
        logger.warning("stuck_deliveries_enqueued", deliveries=len(taken), delivery_ids=taken[:20])
    return len(taken)


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
                                 task_results=not settings.result_backend, files_root=settings.files_dir,
                                 deadline=deadline)
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
    try:
        hand_over_report(report, settings)
    except SmtpTransientError as exc:
        logger.warning("weekly_report_not_sent_yet", error=str(exc))
        raise self.retry(countdown=_STORE_RETRY_S, exc=exc) from exc
    except SmtpPermanentError as exc:
        # Sending it again would meet the same refusal; the line says why.
        logger.error("weekly_report_refused", error=str(exc), code=exc.code)
    return {"report_id": report.report_id, "period_start": report.period_start.isoformat(),
            "period_end": report.period_end.isoformat(), "subscriptions": len(report.rows),
            "recipients": len(settings.report_recipients)}


def hand_over_report(report: WeeklyReport, settings: Settings) -> None:
    """Email the report to ``HOOKGATE_REPORT_RECIPIENTS`` through the email channel's SMTP servers.

    The text table is the body and the CSV an attachment. The ``Message-ID`` comes from the report's
    id, so a redelivered task sends the same message again, which mail systems and readers can tell.
    """
    text, table = report.to_text(), report.to_csv()
    if settings.report_recipients:
        message = EmailMessage()
        message["Subject"] = report.title
        message["From"] = settings.report_from
        message["To"] = ", ".join(settings.report_recipients)
        message["Message-ID"] = f"<{report.report_id}@{settings.report_from.rpartition('@')[2]}>"
        message.set_content(text)
        message.add_attachment(table.encode(), maintype="text", subtype="csv", filename="weekly-report.csv")
        send_message(message, settings)
    logger.info("weekly_report_ready", subscriptions=len(report.rows), recipients=len(settings.report_recipients),
                text_bytes=len(text), csv_bytes=len(table))
