"""The heavy worker as operators run it: its guards at start, Celery's inspect and Flower on the same app."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from kombu import Connection

from consumers.celery_app import make_celery
from consumers.store.database import migrate
from schemas.keys import Scope
from schemas.settings import Settings
from tests.heavystack import gateway, heavy_worker, ndjson_lines, upload, wait_for_job
from tests.receiver import Receiver, Reply, make_secret
from tests.workers import REPO_ROOT, Hookgate, free_port, settings_env, wait_until

_APP = "consumers.celery_app:celery_app"


@pytest.fixture(scope="module")
def stack_settings(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    directory = tmp_path_factory.mktemp("heavy")
    database_url = f"sqlite:///{directory / 'hookgate.db'}"
    migrate(database_url)
    # Slow on purpose (a confirm per line): a job runs long enough to be seen running.
    return Settings(broker_url=broker_url, database_url=database_url, files_dir=directory / "files",
                    import_batch_lines=1, import_checkpoint_interval_s=0.2)


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **settings_env(settings), **extra}


def _hookgate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_hard_limit_not_below_the_brokers_consumer_timeout_refuses_to_start(stack_settings: Settings) -> None:
    """With HOOKGATE_HEAVY_TIME_LIMIT_S at the broker's consumer_timeout, the worker exits at once, saying why."""
    env = _env(stack_settings, HOOKGATE_HEAVY_TIME_LIMIT_S="1800", HOOKGATE_BROKER_CONSUMER_TIMEOUT_S="1800")
    result = _hookgate(env, "worker", "-Q", "heavy")
    assert result.returncode == 2, result.stderr
    assert "heavy_time_limit_s must be below broker_consumer_timeout_s" in result.stderr
    soft = _hookgate(_env(stack_settings, HOOKGATE_HEAVY_SOFT_TIME_LIMIT_S="600"), "worker", "-Q", "heavy")
    assert soft.returncode == 2 and "heavy_soft_time_limit_s must be below heavy_time_limit_s" in soft.stderr


def test_the_heavy_queue_refuses_a_pool_without_time_limits(stack_settings: Settings) -> None:
    """``hookgate worker -Q heavy --pool threads`` is refused: only prefork enforces time limits."""
    result = _hookgate(_env(stack_settings), "worker", "-Q", "heavy", "--pool", "threads")
    assert result.returncode == 2 and "prefork" in result.stderr


@pytest.fixture(scope="module")
def worker(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hookgate]:
    # Two pool processes with prefetch 1: one job runs in each, a third waits in the broker, reserved by nobody.
    process = heavy_worker(stack_settings, tmp_path_factory.mktemp("logs"), concurrency=2).start()
    yield process
    process.stop()


def _inspect(settings: Settings, command: str) -> dict[str, list[dict[str, object]]]:
    result = subprocess.run([sys.executable, "-m", "celery", "-A", _APP, "inspect", command, "--json", "-t", "5"],
                            cwd=REPO_ROOT, env=_env(settings), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    return dict(orjson.loads(result.stdout.strip().splitlines()[-1]))


async def test_celery_inspect_and_tasks_endpoint_show_a_running_import(stack_settings: Settings,
                                                                      worker: Hookgate) -> None:
    """While an import runs, `celery inspect active` lists it and GET /v1/tasks shows PROGRESS with its counts."""
    async with gateway(stack_settings) as gw:
        job = await upload(gw, b"".join(ndjson_lines(30_000)), "ndjson")
        task_url = f"/v1/tasks/{job['task_id']}"
        headers = gw.auth(Scope.EVENTS_READ)
        await wait_for_job(gw, job["id"], statuses=("running",))
        states = []
        for _ in range(100):
            task = (await gw.client.get(task_url, headers=headers)).json()
            states.append(task["state"])
            if task["state"] == "PROGRESS" and task["result"]["lines_done"] > 0:
                break
        assert task["state"] == "PROGRESS", states
        assert task["name"] == "tasks.import_file" and task["queue"] == "heavy"
        assert task["result"]["job_id"] == job["id"] and task["result"]["bytes_total"] > 0
        active = _inspect(stack_settings, "active")
        running = [t for tasks in active.values() for t in tasks]
        assert [(t["id"], t["name"], t["args"]) for t in running] == [(job["task_id"], "tasks.import_file",
                                                                      [job["id"]])]
        assert running[0]["delivery_info"]["routing_key"] == "heavy"
        assert all(not tasks for tasks in _inspect(stack_settings, "reserved").values())
        assert all(not tasks for tasks in _inspect(stack_settings, "scheduled").values())
        done = await wait_for_job(gw, job["id"], timeout_s=300)
        # The job is finished in the store before Celery writes the task's SUCCESS.
        for _ in range(100):
            if (final := (await gw.client.get(task_url, headers=headers)).json())["state"] != "PROGRESS":
                break
            await asyncio.sleep(0.05)
        assert final["state"] == "SUCCESS" and final["result"]["published"] == done["counts"]["published"]


async def test_with_both_pool_processes_busy_a_third_job_waits_in_the_broker(stack_settings: Settings,
                                                                             worker: Hookgate) -> None:
    """Prefetch 1: while two imports run, one per pool process, the third is reserved by no one and
    waits, ready, in the heavy queue (at prefetch 4 the worker would hold it)."""
    async with gateway(stack_settings) as gw:
        jobs = [await upload(gw, b"".join(ndjson_lines(10_000, event_type=f"prefetch.{n}")), "ndjson")
                for n in range(3)]
        headers = gw.auth(Scope.EVENTS_READ)

        async def statuses() -> list[str]:
            return [(await gw.client.get(f"/v1/jobs/{job['id']}", headers=headers)).json()["status"] for job in jobs]

        for _ in range(400):
            if (seen := await statuses()).count("running") == 2:
                break
            await asyncio.sleep(0.05)
        assert seen.count("running") == 2 and seen.count("queued") == 1, seen
        with Connection(stack_settings.broker_url) as connection, connection.channel() as channel:
            ready = channel.queue_declare("heavy", passive=True).message_count
        reserved = _inspect(stack_settings, "reserved")
        assert ready == 1
        assert all(not tasks for tasks in reserved.values()), reserved
        finished = [await wait_for_job(gw, job["id"], timeout_s=120) for job in jobs]
    assert [job["status"] for job in finished] == ["succeeded"] * 3


async def test_a_task_that_fails_reads_failure_with_its_error(stack_settings: Settings, worker: Hookgate) -> None:
    """A heavy task sent without its job id fails; GET /v1/tasks answers FAILURE and the error, no result."""
    sender = make_celery(stack_settings)
    try:
        task_id = sender.send_task("tasks.import_file", args=[], queue="heavy").id
    finally:
        sender.close()
    async with gateway(stack_settings) as gw:
        headers = gw.auth(Scope.EVENTS_READ)
        for _ in range(200):
            task = (await gw.client.get(f"/v1/tasks/{task_id}", headers=headers)).json()
            if task["state"] == "FAILURE":
                break
            await asyncio.sleep(0.05)
        assert task["state"] == "FAILURE" and task["result"] is None
        assert task["error"].startswith("TypeError") and "job_id" in task["error"]


def test_flower_lists_the_heavy_worker(stack_settings: Settings, worker: Hookgate, tmp_path: Path) -> None:
    """Flower started on hookgate's Celery app sees the heavy worker and its queue."""
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", _APP, "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=REPO_ROOT, env=_env(stack_settings, FLOWER_UNAUTHENTICATED_API="true"), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def listed() -> bool:
            try:
                workers = httpx.get(f"http://127.0.0.1:{port}/api/workers", params={"refresh": "1"}, timeout=10)
            except httpx.HTTPError:
                return False
            return workers.status_code == 200 and any(name.startswith("heavy@") for name in workers.json())

        wait_until(listed, "Flower listing the heavy worker", timeout_s=40, interval_s=0.5)
        workers = httpx.get(f"http://127.0.0.1:{port}/api/workers", timeout=10).json()
        heavy = next(info for name, info in workers.items() if name.startswith("heavy@"))
        assert [queue["name"] for queue in heavy["active_queues"]] == ["heavy"]
        assert "tasks.import_file" in heavy["registered"]
    finally:
        flower.terminate()
        flower.wait(timeout=20)
        log.close()


async def test_the_worker_checks_the_url_again_when_it_fetches(stack_settings: Settings, worker: Hookgate) -> None:
    """A URL the gateway let through (private allowed there) is refused by a worker that may not reach it."""
    lenient = stack_settings.model_copy(update={"allow_private_targets": True})
    with Receiver(make_secret(), default=Reply(200, body=b'{"type": "a"}\n')) as server:
        async with gateway(lenient) as gw:
            response = await gw.client.post("/v1/files", json={"kind": "import", "format": "ndjson",
                                                               "url": server.url}, headers=gw.auth(Scope.EVENTS_WRITE))
            assert response.status_code == 202, response.text
            done = await wait_for_job(gw, response.json()["id"])
        assert server.ledger == []
    assert done["status"] == "failed" and "loopback" in str(done["error"]), done
