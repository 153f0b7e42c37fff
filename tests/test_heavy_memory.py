"""A 200 MB NDJSON import: the right number of events, with the heavy worker's memory measured and bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from schemas.settings import Settings
from tests.heavystack import EventCounter, gateway, heavy_worker, ndjson_lines, pool_children, upload, wait_for_job

FILE_BYTES = 200 * 1024 * 1024
# The bound for the heavy worker on a 1 GB file; memory must not grow with the file.
PEAK_RSS_BOUND_MB = 200


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _read_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    """The file as an async body, a MiB at a time: the test never holds it whole either."""
    for chunk in _read_chunks(path):
        yield chunk


async def test_a_200_mb_import_publishes_every_line_in_bounded_memory(broker_url: str, sqlite_url: str,
                                                                      tmp_path: Path) -> None:
    """Every line of a 200 MB file is published once, and the pool process's peak RSS stays under 200 MB."""
    source = tmp_path / "big.ndjson"
    lines = 0
    with source.open("wb") as handle:
        for line in ndjson_lines(FILE_BYTES // 4096, padding=4000):
            handle.write(line)
            lines += 1
    settings = Settings(broker_url=broker_url, database_url=sqlite_url, files_dir=tmp_path / "files")
    worker = heavy_worker(settings, tmp_path).start()
    try:
        with EventCounter(settings) as counter:
            async with gateway(settings) as gw:
                job = await upload(gw, _file_chunks(source), "ndjson")
                done = await wait_for_job(gw, job["id"], timeout_s=300)
            assert done["status"] == "succeeded", done
            assert done["counts"] == {"published": lines, "errors": 0}
            assert done["progress"]["bytes_done"] == source.stat().st_size >= FILE_BYTES * 0.95
            counter.wait_for_ids({f"{job['id']}:{n}" for n in range(1, lines + 1)}, timeout_s=120)
            assert counter.total() == lines
        (child,) = pool_children(worker.pid)
        peak = _peak_rss_mb(child)
        print(f"heavy pool process peak RSS: {peak:.0f} MB for a {source.stat().st_size / 2**20:.0f} MB file")
        assert peak < PEAK_RSS_BOUND_MB
    finally:
        worker.stop()
