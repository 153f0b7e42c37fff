"""``delete_jobs_before``, for the retention cleanup: finished jobs past the cutoff go, rows and files, in batches."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from consumers.store import jobs
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.jobs import JobFiles
from consumers.store.models import Job
from schemas.ids import new_id
from schemas.jobs import FileFormat, JobKind, JobStatus


def test_old_finished_jobs_and_their_files_are_deleted_and_nothing_else(store_url: str, tmp_path: Path) -> None:
    """Five old finished jobs go (batches of 2), an old running one and a recent finished one stay, with their files."""
    files_root = tmp_path / "files"
    files_root.mkdir()
    engine = make_engine(store_url)
    sessions = make_sessionmaker(engine)
    now = utcnow()

    def job(age: timedelta, status: JobStatus) -> str:
        job_id = new_id()
        jobs.create_job(sessions, job_id=job_id, task_id=new_id(), kind=JobKind.IMPORT, format=FileFormat.NDJSON,
                        bytes_total=1)
        with sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job_id).values(created_at=now - age, status=status.value))
        files = JobFiles(files_root, job_id)
        files.directory.mkdir()
        files.input.write_bytes(b"{}\n")
        return job_id

    try:
        old = [job(timedelta(days=40), s) for s in (JobStatus.SUCCEEDED, JobStatus.FAILED) * 2]
        old.append(job(timedelta(days=31), JobStatus.SUCCEEDED))
        running = job(timedelta(days=40), JobStatus.RUNNING)
        recent = job(timedelta(days=29), JobStatus.SUCCEEDED)
        assert jobs.delete_jobs_before(sessions, files_root, now - timedelta(days=30), batch_size=2) == 5
        with sessions() as session:
            assert set(session.execute(select(Job.id)).scalars()) == {running, recent}
        assert {p.name for p in files_root.iterdir()} == {running, recent}
        assert jobs.delete_jobs_before(sessions, files_root, now - timedelta(days=30)) == 0
        assert all(not JobFiles(files_root, job_id).directory.exists() for job_id in old)
    finally:
        engine.dispose()
