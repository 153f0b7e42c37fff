"""``POST /v1/files`` and ``/v1/jobs``: bad requests are clear problems that create nothing; jobs read back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from kombu import Connection

from consumers.store.models import Job
from consumers.topology import declare_topology, task_queue
from schemas.keys import Scope
from schemas.settings import Settings
from schemas.topology import HEAVY_QUEUE
from tests.apiclient import Gateway, assert_problem, count_rows
from tests.heavystack import gateway


@pytest.fixture
def settings(make_settings: Callable[..., Settings], store_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url=store_url, files_dir=tmp_path / "files", max_file_bytes=1000,
                         allow_private_targets=False)


@pytest.fixture
async def gw(settings: Settings) -> AsyncIterator[Gateway]:
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge(HEAVY_QUEUE)
    async with gateway(settings) as started:
        yield started


def _heavy_messages(settings: Settings) -> int:
    with Connection(settings.broker_url) as conn:
        return int(task_queue(HEAVY_QUEUE).bind(conn.default_channel).queue_declare(passive=True).message_count)


def _nothing_created(gw: Gateway, settings: Settings) -> None:
    assert count_rows(gw.sessions, Job) == 0
    assert not settings.files_dir.exists() or not any(settings.files_dir.iterdir())
    assert _heavy_messages(settings) == 0


@pytest.mark.parametrize(("params", "body", "headers", "status"), [
    ({"kind": "import", "format": "xml"}, b'{"type": "a"}\n', {}, 422),
    ({"kind": "import"}, b'{"type": "a"}\n', {}, 422),
    ({"kind": "report", "format": "csv"}, b"x", {}, 422),
    ({"kind": "import", "format": "ndjson", "extra": "1"}, b'{"type": "a"}\n', {}, 422),
    ({"kind": "import", "format": "ndjson"}, b"", {}, 422),
    ({"kind": "import", "format": "ndjson"}, b"x" * 1001, {}, 413),
    ({}, b'{"kind": "import", "format": "ndjson"}', {"content-type": "application/json"}, 422),
    ({}, b'{"kind": "import", "format": "ndjson", "url": "ftp://example.com/x"}',
     {"content-type": "application/json"}, 422),
    ({}, b'{"kind": "import", "format": "ndjson", "url": "http://127.0.0.1/x"}',
     {"content-type": "application/json"}, 422),
    ({}, b'{"kind": "report", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}',
     {"content-type": "application/json"}, 422),
    ({}, b'{"kind": "report", "since": "2026-01-01T00:00:00", "until": "2026-01-02T00:00:00Z"}',
     {"content-type": "application/json"}, 422),
    ({}, b'{"kind": "nothing"}', {"content-type": "application/json"}, 422),
    ({}, b"{not json", {"content-type": "application/json"}, 400),
    ({}, b"type,data\n", {"content-type": "text/csv"}, 415),
])
async def test_bad_job_requests_are_problems_and_create_nothing(
        gw: Gateway, settings: Settings, params: dict[str, str], body: bytes, headers: dict[str, str],
        status: int) -> None:
    """Each malformed request gets its 4xx problem; no job row, no file and no task message is left."""
    response = await gw.client.post("/v1/files", params=params, content=body,
                                    headers={**gw.auth(Scope.EVENTS_WRITE), **headers})
    assert_problem(response, status)
    _nothing_created(gw, settings)


async def test_a_private_url_is_refused_naming_the_address(gw: Gateway, settings: Settings) -> None:
    """An import from a URL that resolves to loopback is refused at once by the SSRF guard."""
    response = await gw.client.post("/v1/files", json={"kind": "import", "format": "csv", "url": "http://localhost/x"},
                                    headers=gw.auth(Scope.EVENTS_WRITE))
    body = assert_problem(response, 422)
    assert "loopback" in body["detail"] and body["errors"][0]["field"] == "url"
    _nothing_created(gw, settings)


async def test_job_routes_need_their_scopes(gw: Gateway, settings: Settings) -> None:
    """Creating a job needs events:write, reading one events:read, the queues admin; missing keys are 401."""
    upload = {"params": {"kind": "import", "format": "ndjson"}, "content": b'{"type": "a"}\n'}
    assert_problem(await gw.client.post("/v1/files", **upload), 401)  # type: ignore[arg-type]
    assert_problem(await gw.client.post("/v1/files", headers=gw.auth(Scope.EVENTS_READ), **upload), 403)  # type: ignore[arg-type]
    assert_problem(await gw.client.get("/v1/jobs/x", headers=gw.auth(Scope.EVENTS_WRITE)), 403)
    assert_problem(await gw.client.get("/v1/tasks/x", headers=gw.auth(Scope.EVENTS_WRITE)), 403)
    assert_problem(await gw.client.get("/v1/queues", headers=gw.auth(Scope.EVENTS_READ)), 403)
    _nothing_created(gw, settings)


async def test_an_upload_is_a_queued_job_with_its_task_waiting_on_the_heavy_queue(
        gw: Gateway, settings: Settings) -> None:
    """A 202 answers the stored job (id, task_id, queued, the file's size), and its task waits on heavy."""
    body = b'{"type": "a.b"}\n{"type": "a.c"}\n'
    response = await gw.client.post("/v1/files", params={"kind": "import", "format": "ndjson"}, content=body,
                                    headers=gw.auth(Scope.EVENTS_WRITE))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["kind"] == "import" and job["format"] == "ndjson"
    assert job["task_id"] == job["current_task_id"]
    assert job["progress"] == {"bytes_done": 0, "bytes_total": len(body), "lines_done": 0, "percent": 0.0}
    assert (settings.files_dir / job["id"] / "input").read_bytes() == body
    assert _heavy_messages(settings) == 1
    read = await gw.client.get(f"/v1/jobs/{job['id']}", headers=gw.auth(Scope.EVENTS_READ))
    assert read.json() == job
    task = await gw.client.get(f"/v1/tasks/{job['task_id']}", headers=gw.auth(Scope.EVENTS_READ))
    assert task.json()["state"] == "PENDING"
    errors = await gw.client.get(f"/v1/jobs/{job['id']}/errors", headers=gw.auth(Scope.EVENTS_READ))
    assert "no errors file" in assert_problem(errors, 404)["detail"]


async def test_unknown_jobs_and_malformed_task_ids_are_404(gw: Gateway) -> None:
    """A job id nobody has, its downloads, and a task id that cannot be one answer 404 problems."""
    headers = gw.auth(Scope.EVENTS_READ)
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/errors", "/v1/jobs/nope/result", "/v1/tasks/no%20pe"):
        assert_problem(await gw.client.get(path, headers=headers), 404)



@pytest.fixture
async def default_limits_gw(make_settings: Callable[..., Settings], store_url: str,
                            tmp_path: Path) -> AsyncIterator[tuple[Gateway, Settings]]:
    """A gateway with the default upload limit (2 GiB) and body limit."""
    settings = make_settings(database_url=store_url, files_dir=tmp_path / "files")
    with Connection(settings.broker_url) as conn:
        declare_topology(conn)
        conn.default_channel.queue_purge(HEAVY_QUEUE)
    async with gateway(settings) as started:
        yield started, settings


def test_the_upload_limit_defaults_to_2_gib() -> None:
    """HOOKGATE_MAX_FILE_BYTES, the limit of an uploaded file, is 2 GiB unless set."""
    assert Settings().max_file_bytes == 2 * 1024**3


async def test_an_upload_declaring_more_than_2_gib_is_413_by_default(
        default_limits_gw: tuple[Gateway, Settings]) -> None:
    """With the default limit, an upload whose Content-Length is one byte over 2 GiB is refused before it is read."""
    gw, settings = default_limits_gw
    response = await gw.client.post("/v1/files", params={"kind": "import", "format": "ndjson"}, content=b"x",
                                    headers={**gw.auth(Scope.EVENTS_WRITE), "content-length": str(2 * 1024**3 + 1)})
    assert str(2 * 1024**3) in assert_problem(response, 413)["detail"]
    _nothing_created(gw, settings)


async def _chunks(body: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_json_job_request_over_the_ordinary_body_limit_is_413_and_creates_nothing(
        default_limits_gw: tuple[Gateway, Settings], chunked: bool) -> None:
    """The JSON form of POST /v1/files is held to max_body_bytes, not the upload limit, declared or streamed."""
    gw, settings = default_limits_gw
    body = orjson.dumps({"kind": "import", "format": "ndjson",
                         "url": "https://example.com/" + "x" * settings.max_body_bytes})
    response = await gw.client.post("/v1/files", content=_chunks(body) if chunked else body,
                                    headers={**gw.auth(Scope.EVENTS_WRITE), "content-type": "application/json"})
    assert str(settings.max_body_bytes) in assert_problem(response, 413)["detail"]
    _nothing_created(gw, settings)
