"""``GET /v1/queues``: the broker's own figures for every hookgate queue, ready messages and consumers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kombu import Connection

from consumers.celery_app import make_celery
from consumers.queue_stats import hookgate_queues
from consumers.topology import declare_topology
from schemas import topology
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import assert_problem, running_gateway
from tests.heavystack import gateway, heavy_worker


async def test_queues_report_waiting_messages_and_consumers(broker_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """Three heavy tasks wait with nobody consuming; once a heavy worker runs they are gone and it is counted."""
    settings = Settings(broker_url=broker_url, database_url=sqlite_url, files_dir=tmp_path / "files")
    with Connection(broker_url) as conn:
        declare_topology(conn)
        for name in hookgate_queues():
            conn.default_channel.queue_purge(name)
    sender = make_celery(settings)
    try:
        for _ in range(3):
            sender.send_task("tasks.import_file", args=["no-such-job"], queue=topology.HEAVY_QUEUE)
    finally:
        sender.close()
    async with gateway(settings) as gw:
        headers = gw.auth(Scope.ADMIN)

        async def figures() -> dict[str, dict[str, object]]:
            response = await gw.client.get("/v1/queues", headers=headers)
            assert response.status_code == 200, response.text
            return {item["name"]: item for item in response.json()["items"]}

        before = await figures()
        assert list(before) == [topology.INGEST_QUEUE, topology.DEAD_QUEUE, topology.WEBHOOKS_QUEUE,
                                topology.EMAIL_QUEUE, topology.HEAVY_QUEUE]
        assert before[topology.HEAVY_QUEUE] == {"name": "heavy", "messages_ready": 3, "messages_unacknowledged": None,
                                                "consumers": 0}
        assert before[topology.INGEST_QUEUE]["messages_ready"] == 0
        worker = heavy_worker(settings, tmp_path).start()
        try:
            last: dict[str, object] = {}

            async def drained() -> bool:
                nonlocal last
                last = (await figures())[topology.HEAVY_QUEUE]
                return last["messages_ready"] == 0 and last["consumers"] == 1

            for _ in range(200):
                if await drained():
                    break
                await asyncio.sleep(0.1)
            assert last == {"name": "heavy", "messages_ready": 0, "messages_unacknowledged": None, "consumers": 1}
        finally:
            worker.stop()


async def test_queues_answer_503_when_the_broker_is_away(sqlite_url: str, tmp_path: Path) -> None:
    """With no broker at the configured address the route answers 503 with Retry-After."""
    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:1//", database_url=sqlite_url)
    async with running_gateway(settings) as gw:
        response = await gw.client.get("/v1/queues", headers=gw.auth(Scope.ADMIN))
        assert assert_problem(response, 503)["detail"].startswith("the broker did not answer")
        assert response.headers["retry-after"] == str(settings.broker_retry_after_s)
