"""Finishing a split import in the store: the chunks' error reports joined in line order, outside the transaction."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from consumers.store import jobs
from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.jobs import ERRORS_HEADER, Checkpoint, Chunk, JobFiles
from consumers.store.models import Job
from schemas.ids import new_id
from schemas.jobs import FileFormat, JobKind, JobStatus
from tests.test_store_write_lock import lock_is_free

CHUNK_ERRORS = [b"2,not JSON\r\n", b"7,no type\r\n"]


@pytest.fixture
def sessions(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(store_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def split_job(sessions: sessionmaker[Session], files: Path, chunk_errors: list[bytes]) -> tuple[str, list[str]]:
    """A running import split into one chunk per entry of ``chunk_errors``, each chunk finished with
    that error report written; the job's id and its chunks' ids."""
    job_id, task_id = new_id(), new_id()
    jobs.create_job(sessions, job_id=job_id, task_id=task_id, kind=JobKind.IMPORT, format=FileFormat.NDJSON,
                    bytes_total=100 * len(chunk_errors))
    assert jobs.claim(sessions, job_id, task_id, max_lost_runs=3).job is not None
    chunks = [Chunk(job_id=new_id(), task_id=new_id(), start=100 * n, end=100 * (n + 1), lines_before=5 * n)
              for n in range(len(chunk_errors))]
    assert jobs.split(sessions, job_id, task_id, chunks)
    for chunk, errors in zip(chunks, chunk_errors, strict=True):
        assert jobs.claim(sessions, chunk.job_id, chunk.task_id, max_lost_runs=3).job is not None
        report = JobFiles(files, chunk.job_id).errors
        report.parent.mkdir(parents=True)
        report.write_bytes(ERRORS_HEADER + errors)
        assert jobs.finish(sessions, chunk.job_id, chunk.task_id, JobStatus.SUCCEEDED,
                           checkpoint=Checkpoint(chunk.end, 5 * (chunks.index(chunk) + 1), len(ERRORS_HEADER + errors),
                                                 4, 1))
    JobFiles(files, job_id).directory.mkdir(parents=True)
    return job_id, [chunk.job_id for chunk in chunks]


def the_job(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_the_chunks_error_reports_are_joined_in_line_order(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    job_id, _ = split_job(sessions, tmp_path, CHUNK_ERRORS)
    assert jobs.finish_chunked(sessions, tmp_path, job_id) is JobStatus.SUCCEEDED
    report = JobFiles(tmp_path, job_id).errors
    assert report.read_bytes() == ERRORS_HEADER + b"".join(CHUNK_ERRORS)
    job = the_job(sessions, job_id)
    assert (job.status, job.error_bytes, job.published, job.errors_count) == ("succeeded", report.stat().st_size, 8, 2)
    assert sorted(p.name for p in report.parent.iterdir()) == ["errors.csv"]
    # Finishing again changes nothing.
    assert jobs.finish_chunked(sessions, tmp_path, job_id) is JobStatus.SUCCEEDED


def test_reports_that_cannot_be_joined_fail_the_job_with_the_reason(sessions: sessionmaker[Session],
                                                                    tmp_path: Path) -> None:
    job_id, _ = split_job(sessions, tmp_path, CHUNK_ERRORS)
    # Where the joined report goes, a directory that cannot be replaced by a file.
    report = JobFiles(tmp_path, job_id).errors
    report.mkdir()
    (report / "in-the-way").touch()
    assert jobs.finish_chunked(sessions, tmp_path, job_id) is JobStatus.FAILED
    job = the_job(sessions, job_id)
    assert job.error is not None
    assert job.error.startswith("the chunks' error reports could not be joined: ")
    assert (job.running, job.published, job.errors_count) == (False, 8, 2)
    # No half-written report is left behind.
    assert sorted(p.name for p in report.parent.iterdir()) == ["errors.csv"]


def test_the_store_is_not_locked_while_the_reports_are_joined(sqlite_url: str, tmp_path: Path) -> None:
    """A chunk's report that cannot be read yet (a pipe nobody writes to) holds up the join, not the store."""
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    files = tmp_path / "files"
    job_id, chunk_ids = split_job(sessions, files, CHUNK_ERRORS)
    stalled = JobFiles(files, chunk_ids[1]).errors
    stalled.unlink()
    os.mkfifo(stalled)
    finished: list[JobStatus | None] = []
    joiner = threading.Thread(target=lambda: finished.append(jobs.finish_chunked(sessions, files, job_id)))
    joiner.start()
    try:
        joiner.join(timeout=1)
        assert joiner.is_alive(), "the join did not wait on the pipe"
        assert lock_is_free(Path(sqlite_url.removeprefix("sqlite:///")))
        # Another writer gets through meanwhile.
        jobs.create_job(sessions, job_id=new_id(), task_id=new_id(), kind=JobKind.IMPORT, format=FileFormat.NDJSON)
    finally:
        # Opening the pipe's other end lets the join go on; a pipe cannot seek past its header, so
        # the join fails and says so.
        with open(stalled, "wb"):
            pass
        joiner.join(timeout=10)
    assert finished == [JobStatus.FAILED]
    assert "could not be joined" in (the_job(sessions, job_id).error or "")
    engine.dispose()
