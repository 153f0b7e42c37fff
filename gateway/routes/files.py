"""``POST /v1/files``: start a heavy job, an import of an uploaded or downloaded file, or a delivery report."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence
from typing import Annotated, Any

import structlog
from celery import Signature
from pydantic import BaseModel, ConfigDict, Field, RootModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.channels import task_message
from consumers.publisher import PublishError
from consumers.ssrf import TargetPolicy, UnsafeTargetError, check_target
from consumers.store import jobs
from consumers.store.jobs import JobFiles
from gateway.auth import Principal, authenticate
from gateway.problems import Problem
from gateway.routes._json import model_response, read_model, validated
from schemas.ids import new_id
from schemas.jobs import FileFormat, ImportFromUrl, JobKind, ReportRequest
from schemas.keys import Scope
from schemas.settings import Settings
from schemas.topology import HEAVY_QUEUE

__all__ = ["FILES_PATH", "JobRequest", "routes"]

log = structlog.get_logger(__name__)

FILES_PATH = "/v1/files"
_TASKS = {JobKind.IMPORT: "tasks.import_file", JobKind.REPORT: "tasks.build_report"}


class _UploadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: JobKind
    format: FileFormat


class JobRequest(RootModel[Annotated[ImportFromUrl | ReportRequest, Field(discriminator="kind")]]):
    """A job asked for with JSON: ``kind`` picks the model the body must satisfy."""


async def _start(request: Request, principal: Principal, *, job_id: str, kind: JobKind, format: FileFormat,
                 then: Sequence[Signature] = (), **fields: Any) -> Response:
    """Store the job, send its task (confirmed) with the tasks that follow it, and answer 202 with the job;
    undo both on a 503."""
    settings: Settings = request.app.state.settings
    task_id = new_id()
    await asyncio.to_thread(jobs.create_job, request.app.state.sessions, job_id=job_id, task_id=task_id, kind=kind,
                            format=format, owner_key_id=principal.key_id, **fields)
    message = task_message(request.app.state.celery, _TASKS[kind], HEAVY_QUEUE, [job_id], task_id, then=then)
    try:
        await request.app.state.publisher.publish([message])
    except PublishError as exc:
        await asyncio.to_thread(_discard, request, job_id)
        raise Problem(503, f"the broker did not take the job ({exc}); nothing was kept, send it again",
                      headers={"Retry-After": str(settings.broker_retry_after_s)}) from exc
    log.info("job_created", job_id=job_id, task_id=task_id, kind=kind.value, key_id=principal.key_id)
    job = await asyncio.to_thread(jobs.get_job, request.app.state.read_sessions, job_id)
    assert job is not None
    return model_response(job, 202)


def _discard(request: Request, job_id: str) -> None:
    settings: Settings = request.app.state.settings
    jobs.delete_job(request.app.state.sessions, job_id)
    shutil.rmtree(JobFiles(settings.files_dir, job_id).directory, ignore_errors=True)


async def _receive_file(request: Request, files: JobFiles, max_bytes: int) -> int:
    """Stream the request body to the job's input file, never holding it whole; returns its size."""
    files.directory.mkdir(parents=True)
    size = 0
    try:
        sink = await asyncio.to_thread(files.input.open, "wb")
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise Problem(413, f"the file is larger than the limit of {max_bytes} bytes")
                if chunk:
                    await asyncio.to_thread(sink.write, chunk)
        finally:
            await asyncio.to_thread(sink.close)
        if size == 0:
            raise Problem(422, "the file is empty")
    except BaseException:
        shutil.rmtree(files.directory, ignore_errors=True)
        raise
    return size


async def post_file(request: Request) -> Response:
    principal = await authenticate(request, Scope.EVENTS_WRITE)
    settings: Settings = request.app.state.settings
    job_id = new_id()
    if request.query_params:
        query = validated(_UploadQuery, dict(request.query_params))
        if query.kind is not JobKind.IMPORT:
            raise Problem(422, "only imports take a file; a report is asked for with a JSON body")
        files = JobFiles(settings.files_dir, job_id)
        size = await _receive_file(request, files, settings.max_file_bytes)
        try:
            return await _start(request, principal, job_id=job_id, kind=query.kind, format=query.format,
                                bytes_total=size, params={"source": principal.default_source})
        except BaseException:
            shutil.rmtree(files.directory, ignore_errors=True)
            raise
    body = (await read_model(request, JobRequest)).root
    if isinstance(body, ReportRequest):
        params = body.model_dump(mode="json", exclude={"kind"})
        # Emailed once written: chain(build_report, email_report), both on the heavy queue.
        then = [request.app.state.celery.signature("tasks.email_report", args=(job_id, list(body.email_to)),
                                                   immutable=True, queue=HEAVY_QUEUE)] if body.email_to else []
        return await _start(request, principal, job_id=job_id, kind=JobKind.REPORT, format=FileFormat.CSV,
                            then=then, params=params)
    try:
        await asyncio.to_thread(check_target, body.url, TargetPolicy.from_settings(settings))
    except UnsafeTargetError as exc:
        raise Problem(422, f"url: {exc}", errors=[{"field": "url", "message": str(exc)}]) from exc
    JobFiles(settings.files_dir, job_id).directory.mkdir(parents=True)
    return await _start(request, principal, job_id=job_id, kind=JobKind.IMPORT, format=body.format,
                        source_url=body.url, params={"source": principal.default_source})


routes = [Route(FILES_PATH, post_file, methods=["POST"], name="files")]
