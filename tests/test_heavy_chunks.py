"""Large NDJSON imports split into chunks imported in parallel (a group) and finished by a chord's callback."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.jobs import JobFiles
from consumers.store.models import Job
from schemas.jobs import FINISHED_STATUSES, JobStatus, import_event_id
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, count_rows
from tests.heavystack import (
    EventCounter,
    advanced_past,
    gateway,
    heavy_worker,
    ndjson_lines,
    pool_children,
    upload,
    wait_for_job,
)
from tests.workers import Hookgate

LINES = 6000
# About 9 chunks of the file's 400 KB, on line ends.
CHUNK_BYTES = 45_000


def _settings(broker_url: str, store_url: str, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"broker_url": broker_url, "database_url": store_url, "files_dir": tmp_path / "files",
                                 "import_chunk_bytes": CHUNK_BYTES, "import_batch_lines": 100,
                                 "import_checkpoint_interval_s": 0.2}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def _stack(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Gateway, EventCounter, Hookgate]]:
    """A heavy worker of two pool processes (chunks run two at a time), an event counter and the gateway."""
    worker = heavy_worker(settings, tmp_path, concurrency=2).start()
    try:
        with EventCounter(settings) as counter:
            async with gateway(settings) as gw:
                yield gw, counter, worker
    finally:
        worker.stop()


async def test_a_large_import_is_split_into_chunks_each_line_published_once_and_errors_joined_in_order(
        broker_url: str, store_url: str, tmp_path: Path) -> None:
    """Chunks on line ends run in parallel; ids keep the file's line numbers; the job sums them and joins errors."""
    settings = _settings(broker_url, store_url, tmp_path)
    lines = list(ndjson_lines(LINES, padding=40))
    bad = {1: b"{not json\n", 2999: b"[1]\n", 3000: b'{"type": "has space"}\n', LINES: b'{"data": 1}\n'}
    for number, line in bad.items():
        lines[number - 1] = line
    content = b"".join(lines)
    async with _stack(settings, tmp_path) as (gw, counter, worker):
        job = await upload(gw, content, "ndjson")
        done = await wait_for_job(gw, job["id"], timeout_s=120)
        assert done["status"] == "succeeded", done
        assert done["counts"] == {"published": LINES - len(bad), "errors": len(bad)}
        assert done["progress"] == {"bytes_done": len(content), "bytes_total": len(content),
                                    "lines_done": LINES, "percent": 100.0}
        expected = {import_event_id(job["id"], n) for n in range(1, LINES + 1) if n not in bad}
        counts = counter.wait_for_ids(expected)
        assert set(counts) == expected and set(counts.values()) == {1}
        report = await gw.client.get(done["links"]["errors"], headers=gw.auth(Scope.EVENTS_READ))
        rows = list(csv.reader(io.StringIO(report.text)))
        assert rows[0] == ["line", "error"] and [int(row[0]) for row in rows[1:]] == sorted(bad)
        task = await gw.client.get(f"/v1/tasks/{job['task_id']}", headers=gw.auth(Scope.EVENTS_READ))
        chunks = task.json()["result"]["chunks"]
        assert len(content) // CHUNK_BYTES <= chunks <= len(content) // CHUNK_BYTES + 1
        assert count_rows(gw.sessions, Job) == 1 + chunks
    assert "split import finished" in worker.log_text()


async def test_a_chunk_past_its_soft_limit_continues_and_the_job_waits_for_it(
        broker_url: str, store_url: str, tmp_path: Path) -> None:
    """With a 2 s soft limit, chunks hand over to follow-up tasks; the job ends once they do, each line once."""
    # Three chunks of 8,000 lines, published two lines per confirm: each takes several 2 s runs.
    lines = 24_000
    content = b"".join(ndjson_lines(lines))
    settings = _settings(broker_url, store_url, tmp_path, heavy_soft_time_limit_s=2, heavy_time_limit_s=30,
                         import_batch_lines=2, import_chunk_bytes=len(content) // 3)
    async with _stack(settings, tmp_path) as (gw, counter, worker):
        job = await upload(gw, content, "ndjson")
        done = await wait_for_job(gw, job["id"], timeout_s=100)
        assert done["status"] == "succeeded", done
        assert done["counts"] == {"published": lines, "errors": 0}
        counts = counter.wait_for_ids({import_event_id(job["id"], n) for n in range(1, lines + 1)})
        assert len(counts) == lines and set(counts.values()) == {1}
    assert "import continues in a follow-up task" in worker.log_text()


async def test_a_chunk_whose_pool_process_is_killed_resumes_and_the_job_finishes(
        broker_url: str, store_url: str, tmp_path: Path) -> None:
    """SIGKILL of a pool process running a chunk: Celery retries that chunk from its checkpoint; the job ends whole."""
    lines = 24_000
    content = b"".join(ndjson_lines(lines))
    settings = _settings(broker_url, store_url, tmp_path, import_batch_lines=5, import_chunk_bytes=len(content) // 3)
    async with _stack(settings, tmp_path) as (gw, counter, worker):
        job = await upload(gw, content, "ndjson")
        running = await advanced_past(gw, job["id"], 1999)
        os.kill(pool_children(worker.pid)[0], signal.SIGKILL)
        done = await wait_for_job(gw, job["id"], timeout_s=90)
        assert done["status"] == "succeeded", done
        assert done["counts"] == {"published": lines, "errors": 0}
        counts = counter.wait_for_ids({import_event_id(job["id"], n) for n in range(1, lines + 1)})
        assert len(counts) == lines
        # Only what a chunk published after its last checkpoint went out again.
        assert sum(counts.values()) - lines < running["progress"]["lines_done"]
    assert "WorkerLostError" in worker.log_text()


def _chunks(sessions: sessionmaker[Session], job_id: str) -> list[Job]:
    """A split job's chunk rows, in file order (none before the split)."""
    with sessions() as session:
        parent = session.get(Job, job_id)
        ids: list[str] = parent.params.get("chunks", []) if parent is not None else []
        rows = {chunk.id: chunk for chunk in session.scalars(select(Job).where(Job.id.in_(ids)))}
        return [rows[chunk_id] for chunk_id in ids if chunk_id in rows]


async def _two_chunks_publishing(sessions: sessionmaker[Session], job_id: str, timeout_s: float = 30.0) -> list[Job]:
    """The chunk rows once two chunks have published a batch (so have their input open) and one is queued."""
    deadline = time.monotonic() + timeout_s
    while True:
        chunks = _chunks(sessions, job_id)
        publishing = [chunk for chunk in chunks if chunk.lines_done > chunk.params["lines_before"]]
        if len(publishing) == 2 and len(chunks) == 3:
            return chunks
        assert time.monotonic() < deadline, f"no two chunks publishing after {timeout_s} s: {chunks}"
        await asyncio.sleep(0.02)


async def test_a_chunk_task_that_fails_for_good_fails_the_job_through_the_chords_errback(
        broker_url: str, store_url: str, tmp_path: Path) -> None:
    """The input is gone when the third chunk starts (heavy workers not sharing the files directory, or a
    cleanup): that chunk's task fails, so the chord's callback never runs. Its errback finishes the job: failed,
    naming the chunk and the error, with the other chunks' lines published once and no job left unfinished."""
    lines = 24_000
    content = b"".join(ndjson_lines(lines))
    # Three chunks of 8,000 lines, two at a time, five lines per confirm: the third starts seconds after the others.
    settings = _settings(broker_url, store_url, tmp_path, import_batch_lines=5, import_chunk_bytes=len(content) // 3)
    async with _stack(settings, tmp_path) as (gw, counter, worker):
        job = await upload(gw, content, "ndjson")
        chunks = await _two_chunks_publishing(gw.sessions, job["id"])
        JobFiles(settings.files_dir, job["id"]).input.unlink()
        number = next(n for n, chunk in enumerate(chunks, 1) if chunk.status == JobStatus.QUEUED.value)
        done = await wait_for_job(gw, job["id"], timeout_s=60)
        assert done["status"] == "failed", done
        assert done["error"].startswith(f"chunk {number} of 3: ") and "FileNotFoundError" in done["error"], done
        bounds = [chunk.params["lines_before"] for chunk in chunks] + [lines]
        lost = range(bounds[number - 1] + 1, bounds[number] + 1)
        expected = {import_event_id(job["id"], n) for n in range(1, lines + 1) if n not in lost}
        assert done["counts"] == {"published": len(expected), "errors": 0}
        counts = counter.wait_for_ids(expected)
        assert set(counts) == expected and set(counts.values()) == {1}
        with gw.sessions() as session:
            unfinished = session.scalars(select(Job.id).where(Job.status.not_in([s.value for s in FINISHED_STATUSES])))
            assert unfinished.all() == []
    assert "split import finished" in worker.log_text()
