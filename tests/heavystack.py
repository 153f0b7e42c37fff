"""Heavy-job test helpers: a heavy worker as an operator starts it, a counter of published events, files.

Usage::

    with EventCounter(settings) as counter, heavy_worker(settings, tmp_path) as worker:
        async with running_gateway(settings) as gw:
            job = await upload(gw, ndjson_bytes, "ndjson")
            done = await wait_for_job(gw, job["id"])
        counter.wait_for_ids(expected_ids)

``EventCounter`` consumes hookgate.ingest (where every event lands) and counts each event's id,
so a test sees exactly what an import published, duplicates included.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from kombu import Connection, Consumer, Message

from consumers.batches import BATCH_MEDIA_TYPE
from consumers.topology import declare_topology, ingest_queue
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, running_gateway
from tests.workers import Hookgate

__all__ = ["EventCounter", "advanced_past", "gateway", "heavy_worker", "ndjson_lines", "pool_children", "upload",
           "wait_for_job"]


def ndjson_lines(count: int, *, padding: int = 0, event_type: str = "import.row") -> Iterator[bytes]:
    """``count`` plain events, one per line, each with ``padding`` bytes of data besides its number."""
    pad = "x" * padding
    for number in range(1, count + 1):
        yield orjson.dumps({"type": event_type, "data": {"n": number, "pad": pad}}) + b"\n"


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The gateway app, once its publisher is connected (a job's task is published with confirms)."""
    async with running_gateway(settings) as gw:
        assert await gw.app.state.publisher.wait_connected(10)
        yield gw


def heavy_worker(settings: Settings, log_dir: Path, *args: str, concurrency: int = 1) -> Hookgate:
    """``hookgate worker -Q heavy`` (prefork, prefetch 1), not started yet."""
    return Hookgate(settings, log_dir / "worker-heavy.log", "worker", "-Q", "heavy", "-c", str(concurrency), *args)


def pool_children(pid: int) -> list[int]:
    """The pids of a process's children (a Celery worker's pool processes)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return children


async def upload(gw: Gateway, content: bytes | AsyncIterable[bytes], file_format: str, *,
                 headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST a file for import; returns the job from the 202."""
    response = await gw.client.post("/v1/files", params={"kind": "import", "format": file_format},
                                    content=content, headers=headers or gw.auth(Scope.EVENTS_WRITE))
    assert response.status_code == 202, response.text
    return dict(response.json())


async def wait_for_job(gw: Gateway, job_id: str, timeout_s: float = 60.0,
                       statuses: tuple[str, ...] = ("succeeded", "failed")) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until the job reaches one of ``statuses``."""
    headers = gw.auth(Scope.EVENTS_READ)
    deadline = time.monotonic() + timeout_s
    while True:
        response = await gw.client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        job = dict(response.json())
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s: {job}")
        await asyncio.sleep(0.1)


class EventCounter:
    """Consumes hookgate.ingest in a thread and counts the events by id (a batch message's one by one)."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.broker_url
        self.counts: Counter[str] = Counter()
        self.bodies: dict[str, bytes] = {}
        self.keep_bodies = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-counter", daemon=True)

    def __enter__(self) -> EventCounter:
        with Connection(self._url) as conn:
            declare_topology(conn)
            conn.default_channel.queue_purge(ingest_queue.name)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _on_message(self, body: Any, message: Message) -> None:
        if message.content_type == BATCH_MEDIA_TYPE:
            # Each event of a batch message, by its own id.
            events = {event["id"]: orjson.dumps(event) for event in orjson.loads(message.body)}
        else:
            events = {message.properties["message_id"]: message.body}
        with self._lock:
            self.counts.update(events.keys())
            if self.keep_bodies:
                self.bodies.update(events)
        message.ack()

    def _run(self) -> None:
        with (Connection(self._url) as conn,
              Consumer(conn, [ingest_queue], callbacks=[self._on_message], accept=None, prefetch_count=2000)):
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def wait_for_ids(self, ids: set[str], timeout_s: float = 60.0) -> Counter[str]:
        """Wait until every id in ``ids`` arrived, then a moment more for stragglers; return the counts."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                missing = len(ids - self.counts.keys())
            if not missing:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{missing} of {len(ids)} events never arrived")
            time.sleep(0.05)
        time.sleep(0.3)
        with self._lock:
            return Counter(self.counts)


async def advanced_past(gw: Gateway, job_id: str, lines: int) -> dict[str, Any]:
    """The running job once its confirmed lines pass ``lines``: a run is under way and has published."""
    while True:
        running = await wait_for_job(gw, job_id, statuses=("running",))
        if running["progress"]["lines_done"] > lines:
            return running
        await asyncio.sleep(0.05)
