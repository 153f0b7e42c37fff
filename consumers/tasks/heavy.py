"""The heavy queue: ``tasks.import_file`` publishes a file's lines as events, ``tasks.build_report`` writes a CSV.

Both take a job id and nothing else; the job's row in the store says what to do and how far it got.
An import publishes its lines in batches with publisher confirms and checkpoints the offset of the
last confirmed batch. When the soft time limit fires it finishes confirming what is in flight,
saves the checkpoint and hands the job to a follow-up task (a fresh time limit) that continues
from there; a run that dies (SIGKILL, a lost worker) is run again, by the broker's redelivery or
Celery's ``retry_on_worker_lost``, from the last checkpoint. Event ids derive from the job and
line number, so lines published twice across such a restart are one event to the router. Events
go out as batch messages (``consumers.batches``). An NDJSON file over ``import_chunk_bytes`` is
split into chunk jobs, each such an import of its own range, run as a group; the chord's callback,
``tasks.finish_import``, finishes the job. Reading the input is ``consumers.imports``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from typing import Any, BinaryIO

import structlog
from amqp.exceptions import AMQPError
from celery import Task, chord
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown
from kombu.exceptions import KombuError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from consumers.batches import EVENTS_PER_MESSAGE, batch_messages
from consumers.celery_app import celery_app
from consumers.imports import InputError, Record, chunk_ranges, csv_records, ndjson_records
from consumers.publisher import ConfirmingPublisher, OutgoingMessage, PublishError
from consumers.smtp import SmtpPermanentError, SmtpTransientError, send_message
from consumers.ssrf import TargetPolicy, UnsafeTargetError
from consumers.store import jobs
from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.errors import StoreError
from consumers.store.jobs import ERRORS_HEADER, Checkpoint, Chunk, JobFiles, JobSnapshot
from consumers.topology import declare_topology
from consumers.webhook_client import DownloadTooLarge, WebhookClient, WebhookTransportError
from schemas.events import CloudEvent, EnvelopeError, event_from_json
from schemas.ids import new_id
from schemas.jobs import REPORT_COLUMNS, FileFormat, JobKind, JobStatus, import_event_id
from schemas.settings import Settings

__all__ = ["PROGRESS", "build_report", "email_report", "finish_import", "import_file"]

logger = structlog.get_logger(__name__)

PROGRESS = "PROGRESS"
_SETTINGS: Settings = celery_app.conf.hookgate_settings
# Retries after a transient failure (broker or store away, a download's server failing); a lost worker's
# runs are bounded separately, by HOOKGATE_HEAVY_MAX_WORKER_LOST_RETRIES, in the job's row.
_TRANSIENT_RETRIES = 10
_TRANSIENT_RETRY_S = 5
# A report's email: (soft, hard) time limits, its retries on a transient SMTP failure, and the largest
# CSV attached (above it the mail carries the download link).
_REPORT_EMAIL_LIMITS_S = (120, 150)
_REPORT_EMAIL_RETRIES = 5
_REPORT_EMAIL_RETRY_S = 60
_REPORT_EMAIL_ATTACH_MAX_BYTES = 10 * 1024 * 1024
# Batches published and not yet confirmed at once: the next batch is parsed while one is confirmed.
_IN_FLIGHT = 2
# A batch also ends at this much input, so memory stays flat however long the lines are.
_BATCH_MAX_BYTES = 1 << 20
# Beyond the confirm timeout, what a publish may take to reach a publisher that is (re)connecting.
_CONNECT_GRACE_S = 5.0
# How often a split import's chord callback looks again for chunks still running.
_CHUNK_POLL_S = 2
# Past the soft limit by this much without its signal having been seen, a run hands over on its own.
_SOFT_LIMIT_GRACE_S = 1.0
_HEAVY_TASK: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "retry_on_worker_lost": True,
    # A run killed at the hard limit goes back to the queue rather than being acked as failed: the next run
    # finds it lost and resumes from its checkpoint (bounded like any lost run).
    "acks_on_timeout": False,
    "max_retries": _TRANSIENT_RETRIES,
    # Also the delay of the retry Celery sends for a run whose pool process died (retry_on_worker_lost).
    "default_retry_delay": _TRANSIENT_RETRY_S,
    "soft_time_limit": _SETTINGS.heavy_soft_time_limit_s,
    "time_limit": _SETTINGS.heavy_time_limit_s,
}


class _JobFailed(Exception):
    """The job cannot succeed (bad URL, file too large, bad CSV header): it fails with this message."""


class _Transient(Exception):
    """Something that may pass (broker, store, a server's 5xx): the task is retried from its checkpoint."""


@dataclass(slots=True)
class _ProcessPublisher:
    """A confirming publisher and the event loop it settles on, one per pool process (made after the fork)."""

    pid: int
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    publisher: ConfirmingPublisher | None = None

    def __post_init__(self) -> None:
        threading.Thread(target=self.loop.run_forever, name="heavy-publisher-loop", daemon=True).start()

    def submit(self, messages: list[OutgoingMessage], confirmed: Future[None]) -> None:
        """Publish; ``confirmed`` resolves once every message is confirmed (``PublishError`` otherwise).

        The caller holds the future before the publish is scheduled, so a soft time limit striking in
        between still leaves it something to wait on.
        """
        if self.publisher is None:
            publisher = ConfirmingPublisher(
                self.settings.broker_url, confirm_timeout_s=self.settings.publish_timeout_s,
                max_batch=self.settings.import_batch_lines, declare=declare_topology, name="heavy-publisher",
            )
            asyncio.run_coroutine_threadsafe(publisher.start(), self.loop).result()
            if not asyncio.run_coroutine_threadsafe(publisher.wait_connected(10.0), self.loop).result():
                asyncio.run_coroutine_threadsafe(publisher.close(), self.loop).result()
                raise _Transient("no connection to the broker")
            self.publisher = publisher
        asyncio.run_coroutine_threadsafe(_publish_into(self.publisher, messages, confirmed), self.loop)

    def close(self) -> None:
        if self.publisher is not None:
            asyncio.run_coroutine_threadsafe(self.publisher.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.engine.dispose()


async def _publish_into(publisher: ConfirmingPublisher, messages: list[OutgoingMessage],
                        confirmed: Future[None]) -> None:
    try:
        await publisher.publish(messages)
    except PublishError as exc:
        confirmed.set_exception(exc)
    else:
        confirmed.set_result(None)


_resources: _ProcessPublisher | None = None


def _process_resources() -> _ProcessPublisher:
    global _resources
    if _resources is None or _resources.pid != os.getpid():
        engine = make_engine(_SETTINGS.database_url)
        _resources = _ProcessPublisher(os.getpid(), _SETTINGS, engine, make_sessionmaker(engine))
    return _resources


@worker_process_shutdown.connect
def _close_process_resources(**_: Any) -> None:
    global _resources
    if _resources is not None and _resources.pid == os.getpid():
        _resources.close()
    _resources = None


# -- publishing ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Batch:
    messages: list[OutgoingMessage]
    errors: list[tuple[int, str]]
    after: Checkpoint
    confirmed: Future[None] = field(default_factory=Future)


def _batches(job: JobSnapshot, handle: BinaryIO, settings: Settings) -> Iterator[_Batch]:
    """The job's records from its checkpoint on (to its chunk's end), as events in batches of ``import_batch_lines``.

    Event ids name the import (a chunk's parent) and the line number in the whole file.
    """
    start = job.checkpoint
    read = ndjson_records if job.format is FileFormat.NDJSON else csv_records
    source = job.params.get("source")
    import_id = job.params.get("parent", job.id)
    stop = job.params.get("end", float("inf"))
    if start.bytes_done >= stop:
        # A chunk checkpointed at its end (killed or handed over as it finished): the next line is another's.
        return
    events: list[CloudEvent] = []
    errors: list[tuple[int, str]] = []
    published, refused = start.published, start.errors_count
    batch_start = start.bytes_done
    record: Record | None = None
    for record in read(handle, start.bytes_done, start.lines_done, settings.max_body_bytes):
        if record.fields is not None:
            try:
                event = event_from_json(record.fields, default_source=source,
                                        default_id=import_event_id(import_id, record.line))
            except EnvelopeError as exc:
                errors.append((record.line, exc.detail))
            else:
                events.append(event)
        elif record.error is not None:
            errors.append((record.line, record.error))
        if len(events) + len(errors) >= settings.import_batch_lines or record.end - batch_start >= _BATCH_MAX_BYTES:
            published, refused = published + len(events), refused + len(errors)
            yield _Batch(_messages(events, settings), errors,
                         Checkpoint(record.end, record.line, 0, published, refused))
            events, errors, batch_start = [], [], record.end
        if record.end >= stop:
            break
    if record is not None and (events or errors or record.end > start.bytes_done):
        published, refused = published + len(events), refused + len(errors)
        yield _Batch(_messages(events, settings), errors, Checkpoint(record.end, record.line, 0, published, refused))


def _messages(events: list[CloudEvent], settings: Settings) -> list[OutgoingMessage]:
    # Each within the router's body limit, so none is dead-lettered for its size.
    return batch_messages(events, max_events=EVENTS_PER_MESSAGE, max_bytes=settings.max_body_bytes)


class _ErrorReport:
    """The error report, truncated to the checkpoint on resume so no line is reported twice."""

    def __init__(self, files: JobFiles, size: int) -> None:
        self._handle = open(files.errors, "r+b" if files.errors.exists() else "w+b")  # noqa: SIM115
        self._handle.truncate(size)
        if size == 0:
            self._handle.write(ERRORS_HEADER)
            self._handle.flush()
        self.size = self._handle.tell() if size == 0 else size

    def append(self, errors: list[tuple[int, str]]) -> int:
        """Write these rows after the confirmed ones (again, if a soft limit interrupted the first write)."""
        if errors:
            text = io.StringIO()
            csv.writer(text).writerows(errors)
            self._handle.seek(self.size)
            self._handle.truncate()
            self._handle.write(text.getvalue().encode())
            self._handle.flush()
            self.size = self._handle.tell()
        return self.size

    def close(self) -> None:
        self._handle.close()


@dataclass(slots=True)
class _Run:
    """One task's run of an import: what is confirmed, and when it last told the store and Celery."""

    task: Task
    job: JobSnapshot
    resources: _ProcessPublisher
    confirmed: Checkpoint
    started_s: float = field(default_factory=time.monotonic)
    last_saved_s: float = field(default_factory=time.monotonic)

    @property
    def task_id(self) -> str:
        return str(self.task.request.id)

    def progress(self) -> dict[str, Any]:
        c = self.confirmed
        return {"job_id": self.job.id, "bytes_done": c.bytes_done, "bytes_total": self.job.bytes_total,
                "lines_done": c.lines_done, "published": c.published, "errors": c.errors_count}

    def save(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_saved_s < self.resources.settings.import_checkpoint_interval_s:
            return
        if not jobs.save_checkpoint(self.resources.sessions, self.job.id, self.task_id, self.confirmed):
            raise _JobFailed("the job was taken over by another task")
        self.task.update_state(state=PROGRESS, meta=self.progress())
        self.last_saved_s = time.monotonic()


def _settle(run: _Run, in_flight: deque[_Batch], report: _ErrorReport) -> None:
    """Wait for the oldest batch's confirms, then count it as done; idempotent if interrupted."""
    batch = in_flight[0]
    settings = run.resources.settings
    try:
        # Within the publisher's own deadline; a batch never scheduled (the soft limit struck first) times out.
        batch.confirmed.result(timeout=settings.publish_timeout_s + _CONNECT_GRACE_S)
    except (PublishError, TimeoutError) as exc:
        raise _Transient(f"the broker did not confirm a batch: {exc or 'timeout'}") from exc
    run.confirmed = replace(batch.after, error_bytes=report.append(batch.errors))
    in_flight.popleft()
    run.save()


def _soft_limit_struck(exc: BaseException | None) -> bool:
    """Is this the soft time limit, raised as is or inside a library that wrapped it (SQLAlchemy does)?"""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, SoftTimeLimitExceeded):
            return True
        exc = exc.__cause__ or getattr(exc, "orig", None) or exc.__context__
        seen += 1
    return False


def _publish_all(run: _Run, handle: BinaryIO, report: _ErrorReport, in_flight: deque[_Batch]) -> None:
    soft_limit_s = run.task.soft_time_limit or run.resources.settings.heavy_soft_time_limit_s
    for batch in _batches(run.job, handle, run.resources.settings):
        if time.monotonic() - run.started_s > soft_limit_s + _SOFT_LIMIT_GRACE_S:
            # The signal struck somewhere that swallowed it: hand over all the same, before the hard limit.
            raise SoftTimeLimitExceeded("the soft time limit passed")
        in_flight.append(batch)
        run.resources.submit(batch.messages, batch.confirmed)
        while len(in_flight) >= _IN_FLIGHT:
            _settle(run, in_flight, report)
    while in_flight:
        _settle(run, in_flight, report)


def _download(job: JobSnapshot, files: JobFiles, settings: Settings) -> int:
    """Fetch the job's URL through the SSRF guard into its input file; returns its size."""
    assert job.source_url is not None
    client = WebhookClient(timeout_s=settings.download_timeout_s, user_agent="hookgate-import",
                           policy=TargetPolicy.from_settings(settings))
    partial = files.input.with_suffix(".part")
    try:
        with open(partial, "wb") as sink:
            status, size = client.download(job.source_url, sink, settings.max_file_bytes)
    except UnsafeTargetError as exc:
        partial.unlink(missing_ok=True)
        if exc.__cause__ is not None:  # a name that does not resolve may be a passing DNS failure
            raise _Transient(str(exc)) from exc
        raise _JobFailed(f"the URL may not be fetched: {exc}") from exc
    except DownloadTooLarge as exc:
        partial.unlink(missing_ok=True)
        raise _JobFailed(str(exc)) from exc
    except WebhookTransportError as exc:
        partial.unlink(missing_ok=True)
        raise _Transient(f"the download failed: {exc}") from exc
    finally:
        client.close()
    if status >= 500 or status == 429:
        partial.unlink(missing_ok=True)
        raise _Transient(f"the server answered HTTP {status}")
    if not 200 <= status < 300:
        partial.unlink(missing_ok=True)
        raise _JobFailed(f"the server answered HTTP {status}; redirects are not followed")
    os.replace(partial, files.input)
    return size


def _hand_over(run: _Run) -> str:
    """Give the job, at its confirmed checkpoint, to a follow-up task; returns the follow-up's id."""
    next_task_id = new_id()
    if not jobs.hand_over(run.resources.sessions, run.job.id, run.task_id, next_task_id, run.confirmed):
        raise _JobFailed("the job was taken over by another task")
    import_file.apply_async((run.job.id,), task_id=next_task_id)
    logger.info("import continues in a follow-up task", job_id=run.job.id, next_task_id=next_task_id,
                lines_done=run.confirmed.lines_done, bytes_done=run.confirmed.bytes_done)
    return next_task_id


def _splits(job: JobSnapshot, settings: Settings) -> bool:
    """Is this an NDJSON import large enough to be imported as chunks, not yet begun? (CSV cannot be cut on
    line ends: a quoted field may hold one.)"""
    return (job.format is FileFormat.NDJSON and "parent" not in job.params and job.checkpoint.bytes_done == 0
            and (job.bytes_total or 0) > settings.import_chunk_bytes)


def _split(run: _Run, files: JobFiles) -> dict[str, Any]:
    """Import the file as chunk jobs run in parallel (a group), finished by a chord's callback."""
    settings, sessions = run.resources.settings, run.resources.sessions
    if "chunks" in run.job.params:
        # This task split the job and died before its message was acked: the chord may never have been sent.
        pairs = jobs.chunks_untouched(sessions, run.job.id)
        if pairs is None:
            return {"job_id": run.job.id, "chunks": len(run.job.params["chunks"])}
    else:
        chunks = [Chunk(new_id(), new_id(), start, end, lines)
                  for start, end, lines in chunk_ranges(files.input, settings.import_chunk_bytes)]
        for chunk in chunks:
            JobFiles(settings.files_dir, chunk.job_id).directory.mkdir(parents=True, exist_ok=True)
        if not jobs.split(sessions, run.job.id, run.task_id, chunks):
            raise _JobFailed("the job was taken over by another task")
        pairs = [(chunk.job_id, chunk.task_id) for chunk in chunks]
    # The errback too: a chunk task that fails (not its job: that is counted) leaves the callback unrun.
    finish = finish_import.si(run.job.id)
    finish.link_error(finish_import.si(run.job.id))
    try:
        chord([import_file.si(job_id).set(task_id=task_id) for job_id, task_id in pairs], finish).apply_async()
    except (OSError, AMQPError, KombuError) as exc:
        # The chunks are recorded: the retry finds them untouched and sends the chord again.
        raise _Transient(f"the chunk tasks were not sent: {exc}") from exc
    logger.info("import split into chunks", job_id=run.job.id, chunks=len(pairs))
    return {"job_id": run.job.id, "chunks": len(pairs)}


def _import(run: _Run) -> dict[str, Any]:
    settings = run.resources.settings
    files = JobFiles(settings.files_dir, run.job.id)
    in_flight: deque[_Batch] = deque()
    report: _ErrorReport | None = None
    try:
        if not run.job.downloaded:
            size = _download(run.job, files, settings)
            if not jobs.record_download(run.resources.sessions, run.job.id, run.task_id, size):
                raise _JobFailed("the job was taken over by another task")
            run.job = replace(run.job, downloaded=True, bytes_total=size)
        if "chunks" in run.job.params or _splits(run.job, settings):
            return _split(run, files)
        report = _ErrorReport(files, run.confirmed.error_bytes)
        # A chunk reads its range of its parent's input.
        source = JobFiles(settings.files_dir, run.job.params["parent"]) if "parent" in run.job.params else files
        with open(source.input, "rb") as handle:
            _publish_all(run, handle, report, in_flight)
    except Exception as exc:
        if not _soft_limit_struck(exc):
            raise
        # What is in flight was published: wait for its confirms (the signal interrupted the wait, not the
        # publishing thread) so the checkpoint covers it, and nothing is published twice.
        try:
            while in_flight and report is not None:
                _settle(run, in_flight, report)
        except _Transient as exc:
            logger.warning("a batch in flight at the soft limit was not confirmed; it is published again",
                           job_id=run.job.id, error=str(exc))
        return {"job_id": run.job.id, "continued_in": _hand_over(run), **run.progress()}
    finally:
        if report is not None:
            report.close()
    try:
        finished = jobs.finish(run.resources.sessions, run.job.id, run.task_id, JobStatus.SUCCEEDED,
                               checkpoint=run.confirmed)
    except Exception as exc:
        if not _soft_limit_struck(exc):
            raise
        # Everything is published and confirmed: finish all the same, the hard limit is further off. (A run
        # that raised here would leave its job running with nobody to finish it.)
        finished = jobs.finish(run.resources.sessions, run.job.id, run.task_id, JobStatus.SUCCEEDED,
                               checkpoint=run.confirmed)
    if not finished:
        raise _JobFailed("the job was taken over by another task")
    logger.info("import finished", job_id=run.job.id, published=run.confirmed.published,
                errors=run.confirmed.errors_count)
    return {"job_id": run.job.id, "status": JobStatus.SUCCEEDED.value, **run.progress()}


# -- reports -------------------------------------------------------------------------------------


def _report(task: Task, job: JobSnapshot, resources: _ProcessPublisher) -> dict[str, Any]:
    files = JobFiles(resources.settings.files_dir, job.id)
    files.directory.mkdir(parents=True, exist_ok=True)
    partial = files.report.with_suffix(".part")
    rows = 0
    # Written whole each run, then renamed: a report is quick, and a rerun replaces a half-written one.
    with open(partial, "w", newline="", encoding="utf-8") as sink:
        writer = csv.writer(sink)
        writer.writerow(REPORT_COLUMNS)
        for row in jobs.report_rows(resources.sessions, job.params):
            writer.writerow([value.isoformat() if hasattr(value, "isoformat") else value for value in row])
            rows += 1
            if rows % 10_000 == 0:
                task.update_state(state=PROGRESS, meta={"job_id": job.id, "rows": rows})
    os.replace(partial, files.report)
    if not jobs.finish(resources.sessions, job.id, str(task.request.id), JobStatus.SUCCEEDED, rows=rows):
        raise _JobFailed("the job was taken over by another task")
    logger.info("report written", job_id=job.id, rows=rows)
    return {"job_id": job.id, "status": JobStatus.SUCCEEDED.value, "rows": rows, "path": str(files.report)}


# -- the tasks -----------------------------------------------------------------------------------


def _run_job(task: Task, job_id: str, kind: JobKind) -> dict[str, Any]:
    structlog.contextvars.bind_contextvars(job_id=job_id)
    resources = _process_resources()
    task_id = str(task.request.id)
    try:
        claimed = jobs.claim(resources.sessions, job_id, task_id, resources.settings.heavy_max_worker_lost_retries)
    except StoreError as exc:
        raise task.retry(countdown=_TRANSIENT_RETRY_S) from exc
    if claimed.resend is not None:
        # This task handed the job over, then died before its message was acked: the follow-up may never
        # have been sent. Sending it again is harmless: only one task with its id can hold the job.
        task.app.tasks[task.name].apply_async((job_id,), task_id=claimed.resend)
        return {"job_id": job_id, "continued_in": claimed.resend}
    if claimed.job is None:
        logger.info("heavy task skipped", reason=str(claimed.refusal))
        return {"job_id": job_id, "skipped": str(claimed.refusal)}
    job = claimed.job
    try:
        if kind is JobKind.REPORT:
            return _report(task, job, resources)
        return _import(_Run(task, job, resources, job.checkpoint))
    except (_JobFailed, InputError) as exc:
        jobs.finish(resources.sessions, job_id, task_id, JobStatus.FAILED, error=str(exc))
        logger.warning("heavy job failed", error=str(exc))
        return {"job_id": job_id, "status": JobStatus.FAILED.value, "error": str(exc)}
    except (_Transient, StoreError) as exc:
        # Free the job for this task's retry, which resumes from the last checkpoint.
        jobs.release(resources.sessions, job_id, task_id)
        logger.warning("heavy job postponed", error=str(exc), retry_in_s=_TRANSIENT_RETRY_S)
        if task.request.retries >= _TRANSIENT_RETRIES:
            jobs.finish(resources.sessions, job_id, task_id, JobStatus.FAILED, error=f"gave up: {exc}")
            raise
        raise task.retry(countdown=_TRANSIENT_RETRY_S) from exc
    except Exception as exc:
        # The task fails for good (no retry, no redelivery): fail its job too, or the row stays running with
        # nobody to finish it, and a split import's errback (finish_import) waits for that chunk forever.
        error = f"unexpected error ({type(exc).__name__}); the heavy worker's log has the details"
        jobs.finish(resources.sessions, job_id, task_id, JobStatus.FAILED, error=error)
        raise


@celery_app.task(name="tasks.import_file", **_HEAVY_TASK)
def import_file(self: Task, job_id: str) -> dict[str, Any]:
    """Publish every valid line of the job's file as an event, from its checkpoint on; report the others."""
    return _run_job(self, job_id, JobKind.IMPORT)


@celery_app.task(name="tasks.finish_import", bind=True, acks_late=True, max_retries=None)
def finish_import(self: Task, job_id: str) -> dict[str, Any]:
    """The chord callback of an import split into chunks: once every chunk job has finished, the job's
    counts, its error report (the chunks' in line order) and its status."""
    structlog.contextvars.bind_contextvars(job_id=job_id)
    resources = _process_resources()
    try:
        status = jobs.finish_chunked(resources.sessions, resources.settings.files_dir, job_id)
    except StoreError as exc:
        raise self.retry(countdown=_TRANSIENT_RETRY_S) from exc
    if status is None:
        # A chunk that went past its soft limit runs on in a follow-up task, which the chord does not wait for.
        raise self.retry(countdown=_CHUNK_POLL_S)
    logger.info("split import finished", status=status.value)
    return {"job_id": job_id, "status": status.value}


@celery_app.task(name="tasks.build_report", **_HEAVY_TASK)
def build_report(self: Task, job_id: str) -> dict[str, Any]:
    """Write the CSV of the deliveries the job's range and filters select.

    A report asked for with ``email_to`` runs as ``chain(build_report.si(job_id), email_report.si(job_id, to))``.
    """
    return _run_job(self, job_id, JobKind.REPORT)


@celery_app.task(name="tasks.email_report", bind=True, acks_late=True, max_retries=_REPORT_EMAIL_RETRIES,
                 soft_time_limit=_REPORT_EMAIL_LIMITS_S[0], time_limit=_REPORT_EMAIL_LIMITS_S[1])
def email_report(self: Task, job_id: str, recipients: list[str]) -> dict[str, Any]:
    """Email a finished report job's CSV as an attachment: the second link of
    ``chain(build_report.si(job_id), email_report.si(job_id, recipients))``.

    Idempotent for readers: the ``Message-ID`` is made from the job id, so a redelivered task's second
    copy is recognisable as the same message. A transient SMTP failure retries the task.
    """
    structlog.contextvars.bind_contextvars(job_id=job_id)
    resources = _process_resources()
    settings = resources.settings
    job = jobs.get_job(resources.sessions, job_id)
    if job is None or job.status is not JobStatus.SUCCEEDED:
        logger.warning("report email skipped", reason="the report job did not succeed")
        return {"job_id": job_id, "emailed": False}
    report = JobFiles(settings.files_dir, job_id).report
    message = EmailMessage()
    message["Subject"] = f"hookgate delivery report {job_id} ({job.counts.get('rows', 0)} deliveries)"
    message["From"] = settings.report_from
    message["To"] = ", ".join(recipients)
    message["Message-ID"] = f"<report-{job_id}@{settings.report_from.rpartition('@')[2]}>"
    size = report.stat().st_size
    if size <= _REPORT_EMAIL_ATTACH_MAX_BYTES:
        message.set_content(f"The delivery report of job {job_id} is attached as report.csv.\n")
        message.add_attachment(report.read_bytes(), maintype="text", subtype="csv", filename="report.csv")
    else:
        # Mail servers refuse big messages: the link is enough, and the gateway serves the file.
        message.set_content(f"The delivery report of job {job_id} is {size} bytes, too large to attach; "
                            f"download it from {job.links['result']}.\n")
    try:
        send_message(message, settings)
    except SmtpTransientError as exc:
        logger.warning("report email postponed", error=str(exc), retry_in_s=_REPORT_EMAIL_RETRY_S)
        raise self.retry(countdown=_REPORT_EMAIL_RETRY_S, exc=exc) from exc
    except SmtpPermanentError as exc:
        logger.error("report email refused", error=str(exc), code=exc.code)
        return {"job_id": job_id, "emailed": False, "error": str(exc)}
    logger.info("report emailed", recipients=len(recipients), attached=size <= _REPORT_EMAIL_ATTACH_MAX_BYTES)
    return {"job_id": job_id, "emailed": True}
