"""Long imports resume from their checkpoint: past the soft limit in a follow-up task, after a SIGKILL on redelivery."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from schemas.jobs import import_event_id
from schemas.keys import Scope
from schemas.settings import Settings
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

LINES = 20_000
# Published two lines per confirm, these take several 2 s runs.
SOFT_LIMIT_LINES = 8_000


def _settings(broker_url: str, store_url: str, tmp_path: Path, **overrides: object) -> Settings:
    # Small batches: each waits for its confirms, so the import takes seconds rather than a fraction of one.
    values: dict[str, object] = {"broker_url": broker_url, "database_url": store_url, "files_dir": tmp_path / "files",
                                 "import_batch_lines": 5, "import_checkpoint_interval_s": 0.2}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def test_an_import_past_its_soft_limit_continues_in_follow_up_tasks_publishing_each_line_once(
        broker_url: str, store_url: str, tmp_path: Path) -> None:
    """With a 2 s soft limit the job hands over to follow-up tasks and every line is published exactly once."""
    settings = _settings(broker_url, store_url, tmp_path, heavy_soft_time_limit_s=2, heavy_time_limit_s=30,
                         import_batch_lines=2)
    worker = heavy_worker(settings, tmp_path).start()
    with EventCounter(settings) as counter:
        async with gateway(settings) as gw:
            job = await upload(gw, b"".join(ndjson_lines(SOFT_LIMIT_LINES)), "ndjson")
            try:
                done = await wait_for_job(gw, job["id"], timeout_s=120)
            finally:
                worker.stop()
            assert done["status"] == "succeeded", done
            assert done["continuations"] >= 1, "the import finished within one soft limit: make it longer"
            assert done["current_task_id"] != done["task_id"]
            assert done["counts"] == {"published": SOFT_LIMIT_LINES, "errors": 0}
            counts = counter.wait_for_ids({import_event_id(job["id"], n) for n in range(1, SOFT_LIMIT_LINES + 1)})
            assert len(counts) == SOFT_LIMIT_LINES
            assert set(counts.values()) == {1}, sorted(int(k.rsplit(":", 1)[1]) for k, v in counts.items() if v > 1)
            first = await gw.client.get(f"/v1/tasks/{job['task_id']}", headers=gw.auth(Scope.EVENTS_READ))
            assert first.json()["state"] == "SUCCESS"
            assert first.json()["result"]["continued_in"], first.json()
            last = await gw.client.get(f"/v1/tasks/{done['current_task_id']}", headers=gw.auth(Scope.EVENTS_READ))
            assert last.json()["state"] == "SUCCESS" and last.json()["result"]["status"] == "succeeded"
    assert "import continues in a follow-up task" in worker.log_text()


async def test_an_import_whose_worker_is_killed_resumes_from_its_checkpoint(
        broker_url: str, store_url: str, tmp_path: Path) -> None:
    """SIGKILL of the whole worker mid-import: the redelivered task resumes, so early lines are not published again."""
    settings = _settings(broker_url, store_url, tmp_path)
    worker = heavy_worker(settings, tmp_path)
    with EventCounter(settings) as counter:
        async with gateway(settings) as gw:
            worker.start()
            try:
                job = await upload(gw, b"".join(ndjson_lines(LINES)), "ndjson")
                running = await wait_for_job(gw, job["id"], statuses=("running",))
                while running["progress"]["lines_done"] < 2000:
                    await asyncio.sleep(0.05)
                    running = await wait_for_job(gw, job["id"], statuses=("running",))
                assert running["progress"]["lines_done"] < LINES
                worker.kill()
                worker.start()
                done = await wait_for_job(gw, job["id"], timeout_s=120)
            finally:
                worker.stop()
            assert done["status"] == "succeeded", done
            assert done["counts"] == {"published": LINES, "errors": 0}
            counts = counter.wait_for_ids({import_event_id(job["id"], n) for n in range(1, LINES + 1)})
            assert len(counts) == LINES
            # Resumed from the checkpoint, not from the start: the lines before it went out once.
            assert counts[import_event_id(job["id"], 1)] == 1
            assert counts[import_event_id(job["id"], running["progress"]["lines_done"])] == 1
            # Only what went out after the last checkpoint went out again; a restart would repeat all it did.
            duplicates = sum(counts.values()) - LINES
            assert duplicates < running["progress"]["lines_done"], duplicates


async def test_an_import_whose_pool_process_is_killed_is_retried_and_resumes(
        broker_url: str, store_url: str, tmp_path: Path) -> None:
    """SIGKILL of the pool process only: Celery retries the task (retry_on_worker_lost) and it resumes."""
    settings = _settings(broker_url, store_url, tmp_path)
    worker = heavy_worker(settings, tmp_path).start()
    try:
        with EventCounter(settings) as counter:
            async with gateway(settings) as gw:
                job = await upload(gw, b"".join(ndjson_lines(LINES)), "ndjson")
                running = await wait_for_job(gw, job["id"], statuses=("running",))
                while running["progress"]["lines_done"] < 2000:
                    await asyncio.sleep(0.05)
                    running = await wait_for_job(gw, job["id"], statuses=("running",))
                (child,) = pool_children(worker.pid)
                os.kill(child, signal.SIGKILL)
                done = await wait_for_job(gw, job["id"], timeout_s=120)
                assert done["status"] == "succeeded", done
                assert done["counts"] == {"published": LINES, "errors": 0}
                counts = counter.wait_for_ids({import_event_id(job["id"], n) for n in range(1, LINES + 1)})
                assert counts[import_event_id(job["id"], 1)] == 1
                assert sum(counts.values()) - LINES < running["progress"]["lines_done"]
    finally:
        worker.stop()
    assert "WorkerLostError" in worker.log_text()


async def test_an_import_whose_runs_are_lost_too_often_fails_saying_so(
        broker_url: str, store_url: str, tmp_path: Path) -> None:
    """With HOOKGATE_HEAVY_MAX_WORKER_LOST_RETRIES=1, a second lost run fails the job with a clear error."""
    settings = _settings(broker_url, store_url, tmp_path, heavy_max_worker_lost_retries=1)
    worker = heavy_worker(settings, tmp_path).start()
    try:
        async with gateway(settings) as gw:
            job = await upload(gw, b"".join(ndjson_lines(LINES)), "ndjson")
            seen = 0
            for _ in range(2):
                running = await advanced_past(gw, job["id"], seen + 500)
                (child,) = pool_children(worker.pid)
                os.kill(child, signal.SIGKILL)
                seen = running["progress"]["lines_done"]
            done = await wait_for_job(gw, job["id"], timeout_s=60)
    finally:
        worker.stop()
    assert done["status"] == "failed", done
    assert done["error"] == "the job's task was lost (its worker died) too many times (2 runs)"
    assert done["progress"]["lines_done"] < LINES
