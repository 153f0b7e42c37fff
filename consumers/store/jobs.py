"""Heavy jobs in the store: their rows, checkpoints and hand-overs between tasks, their files, and retention."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import utcnow
from consumers.store.errors import translate_errors
from consumers.store.models import Delivery, Event, Job
from schemas.jobs import (
    FINISHED_STATUSES,
    FileFormat,
    JobKind,
    JobOut,
    JobProgress,
    JobStatus,
)

__all__ = [
    "ERRORS_HEADER",
    "Checkpoint",
    "Chunk",
    "Claim",
    "ClaimRefusal",
    "JobFiles",
    "JobSnapshot",
    "chunks_untouched",
    "claim",
    "create_job",
    "delete_job",
    "delete_jobs_before",
    "finish",
    "finish_chunked",
    "get_job",
    "hand_over",
    "record_download",
    "release",
    "report_rows",
    "save_checkpoint",
    "split",
]

_FINISHED = [status.value for status in FINISHED_STATUSES]
# Rows a report reads from the database at a time: memory stays flat whatever the range.
_REPORT_FETCH = 2000
# The first line of an import's error report.
ERRORS_HEADER = b"line,error\r\n"


@dataclass(frozen=True, slots=True)
class JobFiles:
    """Where a job's files live: one directory per job under ``HOOKGATE_FILES_DIR``."""

    root: Path
    job_id: str

    @property
    def directory(self) -> Path:
        return self.root / self.job_id

    @property
    def input(self) -> Path:
        return self.directory / "input"

    @property
    def errors(self) -> Path:
        """The error report of an import: a CSV of ``line,error``."""
        return self.directory / "errors.csv"

    @property
    def report(self) -> Path:
        return self.directory / "report.csv"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far a job got, as of its last confirmed batch: it resumes from here."""

    bytes_done: int
    lines_done: int
    error_bytes: int
    published: int
    errors_count: int


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    """What a task needs of its job to run it."""

    id: str
    kind: JobKind
    format: FileFormat
    source_url: str | None
    params: dict[str, Any]
    downloaded: bool
    bytes_total: int | None
    checkpoint: Checkpoint
    continuations: int


class ClaimRefusal(StrEnum):
    """Why a task does not run its job."""

    NOT_FOUND = "there is no such job"
    FINISHED = "the job has finished"
    NOT_OURS = "the job belongs to another task"
    LOST_TOO_OFTEN = "the job's task was lost (its worker died) too many times"


@dataclass(frozen=True, slots=True)
class Claim:
    """A task may run the job (``job``), or it should send the continuation ``resend`` again, or neither."""

    job: JobSnapshot | None = None
    resend: str | None = None
    refusal: ClaimRefusal | None = None


def create_job(sessions: sessionmaker[Session], *, job_id: str, task_id: str, kind: JobKind, format: FileFormat,
               source_url: str | None = None, params: dict[str, Any] | None = None,
               bytes_total: int | None = None, owner_key_id: str | None = None) -> None:
    """Store a queued job; an uploaded file (``bytes_total`` known) counts as downloaded."""
    now = utcnow()
    with translate_errors("creating a job"), sessions.begin() as session:
        session.add(Job(
            id=job_id, kind=kind.value, format=format.value, status=JobStatus.QUEUED.value, task_id=task_id,
            current_task_id=task_id, running=False, source_url=source_url, params=params or {},
            downloaded=source_url is None, bytes_total=bytes_total, bytes_done=0, lines_done=0, error_bytes=0,
            published=0, errors_count=0, rows=0, continuations=0, lost_runs=0, owner_key_id=owner_key_id,
            created_at=now, updated_at=now,
        ))


def delete_job(sessions: sessionmaker[Session], job_id: str) -> None:
    """Forget a job whose task was never sent."""
    with translate_errors("deleting a job"), sessions.begin() as session:
        session.execute(delete(Job).where(Job.id == job_id))


def _snapshot(job: Job) -> JobSnapshot:
    return JobSnapshot(
        id=job.id, kind=JobKind(job.kind), format=FileFormat(job.format), source_url=job.source_url,
        params=dict(job.params), downloaded=job.downloaded, bytes_total=job.bytes_total,
        checkpoint=Checkpoint(job.bytes_done, job.lines_done, job.error_bytes, job.published, job.errors_count),
        continuations=job.continuations,
    )


def claim(sessions: sessionmaker[Session], job_id: str, task_id: str, max_lost_runs: int) -> Claim:
    """Let ``task_id`` run the job if the job is its own and unfinished.

    The job is the task's when it is its ``current_task_id``. Finding it marked running by this very
    task means an earlier run of it died (SIGKILL, OOM, a lost worker): the run is counted, and past
    ``max_lost_runs`` the job fails. A task that handed the job over and is run again (it died
    before its message was acked) is told to send the continuation again unless that one started.
    """
    with translate_errors("claiming a job"), sessions.begin() as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None:
            return Claim(refusal=ClaimRefusal.NOT_FOUND)
        if job.status in _FINISHED:
            return Claim(refusal=ClaimRefusal.FINISHED)
        if job.current_task_id != task_id:
            if job.handed_over_by == task_id and not job.running:
                return Claim(resend=job.current_task_id)
            return Claim(refusal=ClaimRefusal.NOT_OURS)
        now = utcnow()
        if job.running:
            job.lost_runs += 1
            if job.lost_runs > max_lost_runs:
                job.status, job.running, job.finished_at, job.updated_at = JobStatus.FAILED.value, False, now, now
                job.error = f"{ClaimRefusal.LOST_TOO_OFTEN} ({job.lost_runs} runs)"
                return Claim(refusal=ClaimRefusal.LOST_TOO_OFTEN)
        job.status, job.running, job.updated_at = JobStatus.RUNNING.value, True, now
        return Claim(job=_snapshot(job))


def _owned(job_id: str, task_id: str) -> Any:
    return update(Job).where(Job.id == job_id, Job.current_task_id == task_id, Job.status.not_in(_FINISHED))


def _checkpoint_values(checkpoint: Checkpoint) -> dict[str, int]:
    return {"bytes_done": checkpoint.bytes_done, "lines_done": checkpoint.lines_done,
            "error_bytes": checkpoint.error_bytes, "published": checkpoint.published,
            "errors_count": checkpoint.errors_count}


def save_checkpoint(sessions: sessionmaker[Session], job_id: str, task_id: str, checkpoint: Checkpoint) -> bool:
    """Record progress; False when the job is no longer this task's."""
    with translate_errors("saving a job checkpoint"), sessions.begin() as session:
        result = session.execute(_owned(job_id, task_id).values(**_checkpoint_values(checkpoint), updated_at=utcnow()))
    return result.rowcount == 1  # type: ignore[attr-defined]


def release(sessions: sessionmaker[Session], job_id: str, task_id: str) -> None:
    """The task stops without finishing (it is retried): not running, so its retry is no lost run."""
    with translate_errors("releasing a job"), sessions.begin() as session:
        session.execute(_owned(job_id, task_id).values(running=False, status=JobStatus.QUEUED.value,
                                                       updated_at=utcnow()))


def record_download(sessions: sessionmaker[Session], job_id: str, task_id: str, size: int) -> bool:
    """The job's URL is downloaded into its input file, ``size`` bytes."""
    with translate_errors("recording a download"), sessions.begin() as session:
        result = session.execute(_owned(job_id, task_id).values(downloaded=True, bytes_total=size,
                                                                updated_at=utcnow()))
    return result.rowcount == 1  # type: ignore[attr-defined]


def hand_over(sessions: sessionmaker[Session], job_id: str, task_id: str, next_task_id: str,
              checkpoint: Checkpoint) -> bool:
    """Save the checkpoint and give the job to ``next_task_id``, which the caller then sends."""
    with translate_errors("handing a job over"), sessions.begin() as session:
        result = session.execute(_owned(job_id, task_id).values(
            **_checkpoint_values(checkpoint), status=JobStatus.QUEUED.value, running=False,
            current_task_id=next_task_id, handed_over_by=task_id, continuations=Job.continuations + 1,
            lost_runs=0, updated_at=utcnow(),
        ))
    return result.rowcount == 1  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Chunk:
    """A byte range of an import's input, on line ends, run as a job of its own: ``lines_before`` lines precede it."""

    job_id: str
    task_id: str
    start: int
    end: int
    lines_before: int


def split(sessions: sessionmaker[Session], job_id: str, task_id: str, chunks: list[Chunk]) -> bool:
    """Store the import's chunks as jobs of their own and mark the job split; False when it is not this task's.

    A chunk job's checkpoint starts at its range's start (absolute offset and line number) and its params name
    the parent and the range's end. The parent stays ``running``, not marked as run by the task, until
    ``finish_chunked``.
    """
    now = utcnow()
    with translate_errors("splitting a job"), sessions.begin() as session:
        job = session.execute(select(Job).where(Job.id == job_id, Job.current_task_id == task_id,
                                                Job.status.not_in(_FINISHED)).with_for_update()).scalar_one_or_none()
        if job is None:
            return False
        session.add_all(Job(
            id=chunk.job_id, kind=job.kind, format=job.format, status=JobStatus.QUEUED.value, task_id=chunk.task_id,
            current_task_id=chunk.task_id, running=False,
            params={**job.params, "parent": job_id, "start": chunk.start, "end": chunk.end,
                    "lines_before": chunk.lines_before}, downloaded=True, bytes_total=chunk.end,
            bytes_done=chunk.start, lines_done=chunk.lines_before, error_bytes=0, published=0, errors_count=0,
            rows=0, continuations=0, lost_runs=0, owner_key_id=job.owner_key_id, created_at=now, updated_at=now,
        ) for chunk in chunks)
        job.params = {**job.params, "chunks": [chunk.job_id for chunk in chunks]}
        job.running, job.updated_at = False, now
    return True


def chunks_untouched(sessions: sessionmaker[Session], job_id: str) -> list[tuple[str, str]] | None:
    """A split job's chunks as (job id, task id) if none has started yet (their tasks may never have been
    sent), else None."""
    with translate_errors("reading a job's chunks"), sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        chunks = _chunks(session, job)
        if any(chunk.status != JobStatus.QUEUED.value or chunk.lost_runs or chunk.continuations for chunk in chunks):
            return None
        return [(chunk.id, chunk.task_id) for chunk in chunks]


def finish_chunked(sessions: sessionmaker[Session], files_root: Path, job_id: str) -> JobStatus | None:
    """Finish a split import once every chunk has: counts summed, error reports joined in line order.

    None while a chunk still runs. The job fails, with the first chunk's error, when any chunk failed,
    or when the error reports cannot be joined (the disk is full, say); a job that is gone (deleted)
    reads as failed, there being nothing left to finish.
    """
    with translate_errors("reading a split job"), sessions() as session:
        # A read: on SQLite it must not queue for the write lock behind busy workers.
        session.connection(execution_options={"readonly": True})
        job = session.get(Job, job_id)
        if job is None or job.status in _FINISHED:
            return JobStatus.FAILED if job is None else JobStatus(job.status)
        chunk_ids: list[str] = job.params["chunks"]
        if any(chunk.status not in _FINISHED for chunk in _chunks(session, job)):
            return None
    # Outside any transaction: an error report may be large, and on SQLite a write transaction holds
    # the whole store's write lock. Finished chunks no longer change, so what is joined stays true.
    try:
        error_bytes, join_error = _join_error_reports(files_root, job_id, chunk_ids), None
    except OSError as exc:
        error_bytes, join_error = 0, f"the chunks' error reports could not be joined: {exc}"
    with translate_errors("finishing a split job"), sessions.begin() as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None or job.status in _FINISHED:
            return JobStatus.FAILED if job is None else JobStatus(job.status)
        chunks = _chunks(session, job)
        failed = [f"chunk {number} of {len(chunks)}: {chunk.error}"
                  for number, chunk in enumerate(chunks, 1) if chunk.status == JobStatus.FAILED.value]
        error = failed[0] if failed else join_error
        now = utcnow()
        job.status = (JobStatus.FAILED if error else JobStatus.SUCCEEDED).value
        job.error = error
        job.running, job.finished_at, job.updated_at = False, now, now
        job.bytes_done, job.lines_done, job.published, job.errors_count = _chunk_totals(chunks)
        job.error_bytes = error_bytes
        return JobStatus(job.status)


def _join_error_reports(files_root: Path, job_id: str, chunk_ids: list[str]) -> int:
    """Write the chunks' error reports as the job's, in line order; its size in bytes.

    Through a file of this process's own, renamed into place: two callbacks finishing the same job
    at once each write the same report, and neither reads the other's half-written one.
    """
    errors = JobFiles(files_root, job_id).errors
    partial = errors.with_name(f"{errors.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with open(partial, "wb") as sink:
            sink.write(ERRORS_HEADER)
            for chunk_id in chunk_ids:
                part = JobFiles(files_root, chunk_id).errors
                if part.exists():
                    with open(part, "rb") as source:
                        source.seek(len(ERRORS_HEADER))
                        shutil.copyfileobj(source, sink)
            size = sink.tell()
        partial.replace(errors)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    return size


def _chunks(session: Session, job: Job) -> list[Job]:
    ids: list[str] = job.params["chunks"]
    return sorted(session.scalars(select(Job).where(Job.id.in_(ids))).all(), key=lambda chunk: ids.index(chunk.id))


def _chunk_totals(chunks: list[Job]) -> tuple[int, int, int, int]:
    """Bytes and lines done (of their ranges), events published and lines refused, over the chunks."""
    return (sum(chunk.bytes_done - chunk.params["start"] for chunk in chunks),
            sum(chunk.lines_done - chunk.params["lines_before"] for chunk in chunks),
            sum(chunk.published for chunk in chunks), sum(chunk.errors_count for chunk in chunks))


def finish(sessions: sessionmaker[Session], job_id: str, task_id: str, status: JobStatus, *,
           checkpoint: Checkpoint | None = None, rows: int | None = None, error: str | None = None) -> bool:
    """Mark the job succeeded or failed, with its last checkpoint."""
    now = utcnow()
    values: dict[str, Any] = {"status": status.value, "running": False, "error": error, "finished_at": now,
                              "updated_at": now}
    if checkpoint is not None:
        values.update(_checkpoint_values(checkpoint))
    if rows is not None:
        values["rows"] = rows
    with translate_errors("finishing a job"), sessions.begin() as session:
        result = session.execute(_owned(job_id, task_id).values(**values))
    return result.rowcount == 1  # type: ignore[attr-defined]


def _links(job: Job) -> dict[str, str]:
    links: dict[str, str] = {}
    if job.kind == JobKind.IMPORT.value and (job.errors_count or job.status == JobStatus.SUCCEEDED.value):
        links["errors"] = f"/v1/jobs/{job.id}/errors"
    if job.kind == JobKind.REPORT.value and job.status == JobStatus.SUCCEEDED.value:
        links["result"] = f"/v1/jobs/{job.id}/result"
    return links


def _job_out(job: Job) -> JobOut:
    total = job.bytes_total
    percent = round(100.0 * job.bytes_done / total, 1) if total else None
    if job.status == JobStatus.SUCCEEDED.value:
        percent = 100.0
    counts = ({"rows": job.rows} if job.kind == JobKind.REPORT.value
              else {"published": job.published, "errors": job.errors_count})
    return JobOut(
        id=job.id, kind=JobKind(job.kind), format=FileFormat(job.format), status=JobStatus(job.status),
        task_id=job.task_id, current_task_id=job.current_task_id,
        progress=JobProgress(bytes_done=job.bytes_done, bytes_total=total, lines_done=job.lines_done,
                             percent=percent),
        counts=counts, error=job.error, links=_links(job), continuations=job.continuations,
        created_at=job.created_at, updated_at=job.updated_at, finished_at=job.finished_at,
    )


def get_job(sessions: sessionmaker[Session], job_id: str) -> JobOut | None:
    with translate_errors("reading a job"), sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        if job.params.get("chunks") and job.status not in _FINISHED:
            # A split import in progress: its figures are its chunks' (not written back to its row).
            job.bytes_done, job.lines_done, job.published, job.errors_count = _chunk_totals(_chunks(session, job))
            session.expunge(job)
        return _job_out(job)


def report_rows(sessions: sessionmaker[Session], params: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    """The deliveries a report covers, oldest first, as ``REPORT_COLUMNS`` tuples, fetched in pages."""
    query = (
        select(Delivery.id, Event.id, Event.type, Delivery.subscription_id, Delivery.status,
               Delivery.attempts_count, Delivery.created_at, Delivery.updated_at, Delivery.last_error)
        .join(Event, Event.pk == Delivery.event_pk)
        .where(Delivery.created_at >= datetime.fromisoformat(params["since"]),
               Delivery.created_at < datetime.fromisoformat(params["until"]))
        .order_by(Delivery.created_at, Delivery.id)
    )
    if params.get("status"):
        query = query.where(Delivery.status == params["status"])
    if params.get("subscription_id"):
        query = query.where(Delivery.subscription_id == params["subscription_id"])
    if params.get("event_type"):
        query = query.where(Event.type == params["event_type"])
    with translate_errors("reading a report's deliveries"), sessions() as session:
        result = session.execute(query.execution_options(yield_per=_REPORT_FETCH))
        for row in result:
            yield tuple(row)


def delete_jobs_before(sessions: sessionmaker[Session], files_root: Path, cutoff: datetime,
                       batch_size: int = 500) -> int:
    """Delete finished jobs created before ``cutoff`` and their files, ``batch_size`` per transaction.

    For the retention cleanup: each batch is a short transaction, so ingest is never locked out.
    Jobs still queued or running are kept whatever their age. Returns how many were deleted.
    """
    deleted = 0
    while True:
        with translate_errors("deleting old jobs"), sessions.begin() as session:
            ids = session.execute(
                select(Job.id).where(Job.created_at < cutoff, Job.status.in_(_FINISHED))
                .order_by(Job.created_at).limit(batch_size)
            ).scalars().all()
            if not ids:
                return deleted
            session.execute(delete(Job).where(Job.id.in_(ids)))
        # Files after the commit: a job row never points at files already gone.
        for job_id in ids:
            shutil.rmtree(JobFiles(files_root, job_id).directory, ignore_errors=True)
        deleted += len(ids)
