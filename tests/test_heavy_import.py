"""Imports through a real heavy worker: every valid line is one event on hookgate.ingest, bad lines are reported."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import pytest

from schemas.jobs import import_event_id
from schemas.keys import Scope
from schemas.settings import Settings
from tests.heavystack import EventCounter, gateway, heavy_worker, ndjson_lines, upload, wait_for_job
from tests.workers import Hookgate


@pytest.fixture(scope="module")
def stack_settings(broker_url: str, module_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings shared by the module's worker and gateways: one vhost, one store, one files directory."""
    return Settings(broker_url=broker_url, database_url=module_store_url, allow_private_targets=True,
                    files_dir=tmp_path_factory.mktemp("files"), import_batch_lines=500)


@pytest.fixture(scope="module")
def worker(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hookgate]:
    """One heavy worker for the module (a start is seconds)."""
    process = heavy_worker(stack_settings, tmp_path_factory.mktemp("logs")).start()
    yield process
    process.stop()


@pytest.fixture
def counter(stack_settings: Settings) -> Iterator[EventCounter]:
    with EventCounter(stack_settings) as events:
        yield events


async def test_ndjson_import_publishes_every_valid_line_once_and_reports_the_others(
        stack_settings: Settings, worker: Hookgate, counter: EventCounter) -> None:
    """Valid lines become events with ids from the job and line number; bad ones are in the error report."""
    lines = list(ndjson_lines(1200))
    bad = {7: b"{not json\n", 300: b"[1, 2]\n", 801: b'{"type": "has space"}\n', 1100: b'{"data": 1}\n'}
    for number, line in bad.items():
        lines[number - 1] = line
    async with gateway(stack_settings) as gw:
        job = await upload(gw, b"".join(lines), "ndjson")
        assert job["status"] == "queued" and job["task_id"]
        done = await wait_for_job(gw, job["id"])
        assert done["status"] == "succeeded", done
        assert done["counts"] == {"published": 1200 - len(bad), "errors": len(bad)}
        assert done["progress"]["lines_done"] == 1200
        assert done["progress"]["bytes_done"] == done["progress"]["bytes_total"] == len(b"".join(lines))
        expected = {import_event_id(job["id"], n) for n in range(1, 1201) if n not in bad}
        counts = counter.wait_for_ids(expected)
        assert set(counts) == expected and set(counts.values()) == {1}
        report = await gw.client.get(done["links"]["errors"], headers=gw.auth(Scope.EVENTS_READ))
        assert report.status_code == 200 and report.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(report.text)))
        assert rows[0] == ["line", "error"]
        assert [int(row[0]) for row in rows[1:]] == sorted(bad)
        assert "not valid JSON" in rows[1][1] and "JSON object" in rows[2][1] and "type" in rows[3][1]
        assert "source" not in rows[4][1] and "type" in rows[4][1]


async def test_csv_import_reads_quoted_multiline_fields_and_numbers_records_by_their_first_line(
        stack_settings: Settings, worker: Hookgate, counter: EventCounter) -> None:
    """CSV records (a header naming the columns, data as JSON) are events; a record spanning lines keeps its number."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["type", "subject", "data"])
    writer.writerow(["order.created", "o-1", '{"note":\n"two lines"}'])  # lines 2-3
    writer.writerow(["order.created", "o-2", "{bad json"])  # line 4
    writer.writerow(["order.paid", "o-3", ""])  # line 5
    writer.writerow(["only-two", "fields"])  # line 6
    async with gateway(stack_settings) as gw:
        counter.keep_bodies = True
        job = await upload(gw, text.getvalue().encode(), "csv")
        done = await wait_for_job(gw, job["id"])
        assert done["status"] == "succeeded", done
        assert done["counts"] == {"published": 2, "errors": 2}
        counts = counter.wait_for_ids({import_event_id(job["id"], 2), import_event_id(job["id"], 5)})
        assert len(counts) == 2
        report = await gw.client.get(done["links"]["errors"], headers=gw.auth(Scope.EVENTS_READ))
        rows = list(csv.reader(io.StringIO(report.text)))[1:]
        assert [int(row[0]) for row in rows] == [4, 6]
        assert b'"note":"two lines"' in counter.bodies[import_event_id(job["id"], 2)]


async def test_a_csv_without_a_type_column_fails_the_job_with_a_reason(
        stack_settings: Settings, worker: Hookgate) -> None:
    """A CSV header that names unknown columns or no type fails the job, publishing nothing."""
    async with gateway(stack_settings) as gw:
        job = await upload(gw, b"kind,data\nx,1\n", "csv")
        done = await wait_for_job(gw, job["id"])
        assert done["status"] == "failed" and "header" in done["error"] and "kind" in done["error"]
        assert done["counts"] == {"published": 0, "errors": 0}


