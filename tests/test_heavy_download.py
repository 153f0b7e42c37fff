"""Imports from a URL: the heavy worker downloads the file through the SSRF guard, then imports it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from schemas.jobs import import_event_id
from schemas.keys import Scope
from schemas.settings import Settings
from tests.heavystack import EventCounter, gateway, heavy_worker, ndjson_lines, wait_for_job
from tests.receiver import Receiver, Reply, make_secret
from tests.workers import Hookgate


@pytest.fixture(scope="module")
def stack_settings(broker_url: str, module_store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # Loopback receivers stand in for the file servers, so private targets are allowed here.
    return Settings(broker_url=broker_url, database_url=module_store_url, files_dir=tmp_path_factory.mktemp("files"),
                    allow_private_targets=True, max_file_bytes=100_000)


@pytest.fixture(scope="module")
def worker(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hookgate]:
    process = heavy_worker(stack_settings, tmp_path_factory.mktemp("logs")).start()
    yield process
    process.stop()


async def _import_from(settings: Settings, url: str) -> dict[str, object]:
    async with gateway(settings) as gw:
        response = await gw.client.post("/v1/files", json={"kind": "import", "format": "ndjson", "url": url},
                                        headers=gw.auth(Scope.EVENTS_WRITE))
        assert response.status_code == 202, response.text
        assert response.json()["progress"]["bytes_total"] is None
        return await wait_for_job(gw, response.json()["id"])


async def test_a_url_import_downloads_the_file_and_publishes_its_lines(stack_settings: Settings,
                                                                       worker: Hookgate) -> None:
    """The worker fetches the URL with a GET and imports what it got, line by line."""
    body = b"".join(ndjson_lines(300))
    with Receiver(make_secret(), default=Reply(200, body=body)) as server, EventCounter(stack_settings) as counter:
        done = await _import_from(stack_settings, server.url + "/export.ndjson")
        assert done["status"] == "succeeded", done
        assert done["progress"] == {"bytes_done": len(body), "bytes_total": len(body), "lines_done": 300,
                                    "percent": 100.0}
        counts = counter.wait_for_ids({import_event_id(str(done["id"]), n) for n in range(1, 301)})
        assert len(counts) == 300
        assert [(r.path, r.headers.get("user-agent")) for r in server.ledger] == [("/hook/export.ndjson",
                                                                                   "hookgate-import")]


@pytest.mark.parametrize(("reply", "reason"), [
    (Reply(404), "HTTP 404"),
    (Reply(302, headers={"location": "http://169.254.169.254/"}), "redirects are not followed"),
    (Reply(200, body=b"x" * 100_001), "larger than the limit of 100000 bytes"),
])
async def test_a_download_that_cannot_succeed_fails_the_job_with_its_reason(
        stack_settings: Settings, worker: Hookgate, reply: Reply, reason: str) -> None:
    """A 4xx, a redirect (never followed) or a file over the size limit fails the job, publishing nothing."""
    with Receiver(make_secret(), default=reply) as server:
        done = await _import_from(stack_settings, server.url)
    assert done["status"] == "failed" and reason in str(done["error"]), done
    assert done["counts"] == {"published": 0, "errors": 0}
    assert not (stack_settings.files_dir / str(done["id"]) / "input").exists()

