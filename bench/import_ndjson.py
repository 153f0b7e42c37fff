"""The import case: NDJSON lines published per second by a heavy worker, and its peak RSS on a 1 GB file.

    .venv/bin/python -m bench.import_ndjson [--lines 100000] [--rss-file-mb 1024] [--chunk-mb 64]

Beside the import, the same run measures three baselines on the same vhost: the raw ceiling of
confirmed persistent publishes (aio-pika, 256 in flight, as bench/run.py measures it) and the
publisher the import uses (``ConfirmingPublisher``, batched confirms) sending ready-made events of
the same size, one per message and then in batch messages of ``EVENTS_PER_MESSAGE`` as the import
sends them, so parsing and validation costs show as the gap between the last two. It also imports
each file again with ``-c 2``: an NDJSON file larger than ``HOOKGATE_IMPORT_CHUNK_BYTES`` (``--chunk-mb``)
is split into chunks imported in parallel, so this shows what the second process adds.
A vhost policy keeps at most 10,000 messages and 64 MiB in hookgate.ingest (drop-head): publishes
are confirmed as usual, and the shared broker does not hold a gigabyte. The heavy worker is
``hookgate worker -Q heavy -c 1`` (prefork, prefetch 1); the job is stored and its task sent the way
``POST /v1/files`` does, so the figure is the worker's, not an upload's. The machine's load average
is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from bench.run import aio_pika_ceiling, rabbitmqctl
from consumers.batches import EVENTS_PER_MESSAGE, batch_messages
from consumers.celery_app import make_celery
from consumers.publisher import ConfirmingPublisher, event_message
from consumers.store import jobs
from consumers.store.database import make_engine, make_sessionmaker, migrate
from consumers.store.jobs import JobFiles
from consumers.topology import declare_topology
from schemas.events import event_from_json
from schemas.ids import new_id
from schemas.jobs import FileFormat, JobKind
from schemas.settings import Settings
from schemas.topology import HEAVY_QUEUE

ROOT = Path(__file__).resolve().parent.parent


def _line(number: int, size: int) -> bytes:
    head = orjson.dumps({"type": "order.imported", "data": {"n": number, "pad": ""}})
    pad = max(0, size - len(head) - 1)
    return orjson.dumps({"type": "order.imported", "data": {"n": number, "pad": "x" * pad}}) + b"\n"


def write_ndjson(path: Path, *, lines: int | None = None, size_bytes: int | None = None, line_bytes: int) -> int:
    """Write lines of about ``line_bytes`` until ``lines`` or ``size_bytes``; returns the line count."""
    written = count = 0
    with path.open("wb") as handle:
        while (lines is None or count < lines) and (size_bytes is None or written < size_bytes):
            count += 1
            line = _line(count, line_bytes)
            handle.write(line)
            written += len(line)
    return count


async def publisher_ceiling(settings: Settings, seconds: float, line_bytes: int, per_message: int) -> float:
    """Ready-made events through the import's own publisher, ``per_message`` events per AMQP message (a batch
    message when more than one), import_batch_lines events per publish, two publishes in flight; events per s."""
    publisher = ConfirmingPublisher(settings.broker_url, confirm_timeout_s=10, max_batch=settings.import_batch_lines,
                                    declare=declare_topology, name="bench")
    await publisher.start()
    assert await publisher.wait_connected(10)
    events = [event_from_json(orjson.loads(_line(i, line_bytes)), default_source="bench", default_id=str(i))
              for i in range(settings.import_batch_lines)]
    if per_message == 1:
        batch = [event_message(e) for e in events]
    else:
        batch = batch_messages(events, max_events=per_message, max_bytes=settings.max_body_bytes)
    sent = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()

    async def loop() -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            await publisher.publish(batch)
            sent += len(events)

    await asyncio.gather(loop(), loop())
    elapsed = time.perf_counter() - started
    await publisher.close()
    return sent / elapsed


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def run_import(settings: Settings, source: Path, lines: int, concurrency: int) -> tuple[float, float]:
    """Import ``source`` with a fresh ``hookgate worker -Q heavy -c CONCURRENCY`` (a file larger than
    ``import_chunk_bytes`` is split into chunks, run ``concurrency`` at a time).

    Returns (lines per second, the largest peak RSS of a pool process in MB).
    """
    env = {**os.environ, "HOOKGATE_BROKER_URL": settings.broker_url, "HOOKGATE_DATABASE_URL": settings.database_url,
           "HOOKGATE_FILES_DIR": str(settings.files_dir), "HOOKGATE_LOG_LEVEL": "WARNING",
           "HOOKGATE_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT),
           "HOOKGATE_IMPORT_CHUNK_BYTES": str(settings.import_chunk_bytes)}
    log = (settings.files_dir.parent / f"worker-{source.stem}-{concurrency}.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "-Q", HEAVY_QUEUE,
                               "-c", str(concurrency)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    celery = make_celery(settings)
    try:
        time.sleep(3)  # the worker's start; the clock below starts when the task does
        job_id, task_id = new_id(), new_id()
        files = JobFiles(settings.files_dir, job_id)
        files.directory.mkdir(parents=True)
        os.link(source, files.input)
        jobs.create_job(sessions, job_id=job_id, task_id=task_id, kind=JobKind.IMPORT, format=FileFormat.NDJSON,
                        bytes_total=source.stat().st_size, params={"source": "bench/import"})
        celery.send_task("tasks.import_file", args=[job_id], task_id=task_id, queue=HEAVY_QUEUE)
        started: float | None = None
        while True:
            job = jobs.get_job(sessions, job_id)
            assert job is not None
            if started is None and job.status.value == "running":
                started = time.perf_counter()
            if job.status.value in ("succeeded", "failed"):
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - (started or time.perf_counter())
        if job.status.value != "succeeded" or job.counts["published"] != lines:
            sys.exit(f"the import did not publish every line: {job}")
        return lines / elapsed, max(_peak_rss_mb(child) for child in _children(worker.pid))
    finally:
        celery.close()
        worker.terminate()
        worker.wait(timeout=60)
        log.close()
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000, help="lines of the throughput file")
    parser.add_argument("--line-bytes", type=int, default=1024, help="bytes per line of the throughput file")
    parser.add_argument("--rss-file-mb", type=int, default=1024, help="size of the file the RSS is measured on")
    parser.add_argument("--rss-line-bytes", type=int, default=4096)
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--chunk-mb", type=int, default=64,
                        help="HOOKGATE_IMPORT_CHUNK_BYTES in MiB: files above it are imported as parallel chunks")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hookgate-bench-import-"))
    vhost = f"hookgate-bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", "bench-bounded", "^hookgate\\.ingest$",
                '{"max-length": 10000, "max-length-bytes": 67108864, "overflow": "drop-head"}')
    settings = Settings(broker_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
                        database_url=f"sqlite:///{work / 'hookgate.db'}", files_dir=work / "files",
                        import_chunk_bytes=args.chunk_mb * 2**20)
    migrate(settings.database_url)
    load_before = os.getloadavg()
    try:
        ceiling = asyncio.run(aio_pika_ceiling(settings.broker_url, args.ceiling_seconds)).rate
        single_messages = asyncio.run(publisher_ceiling(settings, args.ceiling_seconds, args.line_bytes, 1))
        batched = asyncio.run(publisher_ceiling(settings, args.ceiling_seconds, args.line_bytes, EVENTS_PER_MESSAGE))
        small = work / "throughput.ndjson"
        lines = write_ndjson(small, lines=args.lines, line_bytes=args.line_bytes)
        rate, small_rss = run_import(settings, small, lines, 1)
        parallel_rate, parallel_rss = run_import(settings, small, lines, 2)
        small.unlink()
        big = work / "rss.ndjson"
        big_lines = write_ndjson(big, size_bytes=args.rss_file_mb * 2**20, line_bytes=args.rss_line_bytes)
        big_rate, big_rss = run_import(settings, big, big_lines, 1)
        big_parallel_rate, big_parallel_rss = run_import(settings, big, big_lines, 2)
        big_size_mb = big.stat().st_size / 2**20
        big.unlink()
    finally:
        rabbitmqctl("delete_vhost", vhost)
    load_after = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores; load average (1 min) {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    print(f"{'phase':70} {'per s':>9} {'vs ceiling':>10}")
    rows = [
        ("raw ceiling: aio-pika confirmed publish, ~1 KB, 256 in flight", ceiling, ""),
        (f"ConfirmingPublisher, ready-made ~{args.line_bytes} B events, one per message", single_messages, ""),
        (f"ConfirmingPublisher, the same in batch messages of {EVENTS_PER_MESSAGE}", batched, "events"),
        (f"import: {lines:,} NDJSON lines of ~{args.line_bytes} B, published", rate,
         f"peak RSS {small_rss:.0f} MB"),
        ("the same, -c 2: its chunks two at a time", parallel_rate, f"peak RSS {parallel_rss:.0f} MB"),
        (f"import: {big_size_mb:,.0f} MB file, {big_lines:,} lines of ~{args.rss_line_bytes} B", big_rate,
         f"peak RSS {big_rss:.0f} MB"),
        ("the same, -c 2: its chunks two at a time", big_parallel_rate, f"peak RSS {big_parallel_rss:.0f} MB"),
    ]
    for name, value, note in rows:
        print(f"{name:70} {value:>9,.0f} {value / ceiling:>10.2f}  {note}")
    print(f"targets: >= 20,000 lines/s published ({'met' if rate >= 20_000 else 'NOT met'}); "
          f"peak RSS <= 200 MB on a 1 GB file ({'met' if max(big_rss, big_parallel_rss) <= 200 else 'NOT met'})")


if __name__ == "__main__":
    main()
