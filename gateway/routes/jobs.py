"""``/v1/jobs/{id}``: a heavy job's state and progress, and its downloadable error report or result."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from consumers.store import jobs
from consumers.store.jobs import JobFiles
from gateway.auth import authenticate
from gateway.problems import Problem
from gateway.routes._json import model_response
from schemas.jobs import JobOut
from schemas.keys import Scope
from schemas.settings import Settings

__all__ = ["routes"]


async def _job(request: Request) -> JobOut:
    await authenticate(request, Scope.EVENTS_READ)
    job_id = request.path_params["job_id"]
    job = await asyncio.to_thread(jobs.get_job, request.app.state.read_sessions, job_id)
    if job is None:
        raise Problem(404, f"there is no job {job_id!r}")
    return job


async def job_item(request: Request) -> Response:
    return model_response(await _job(request))


def _download(job: JobOut, path: Path, link: str, filename: str) -> Response:
    if link not in job.links or not path.is_file():
        raise Problem(404, f"job {job.id!r} has no {link} file (yet); see its links")
    return FileResponse(path, media_type="text/csv; charset=utf-8", filename=f"{job.id}-{filename}")


async def job_errors(request: Request) -> Response:
    """The error report of an import: ``line,error``, one row per refused line."""
    job = await _job(request)
    settings: Settings = request.app.state.settings
    return _download(job, JobFiles(settings.files_dir, job.id).errors, "errors", "errors.csv")


async def job_result(request: Request) -> Response:
    """The CSV a report job wrote."""
    job = await _job(request)
    settings: Settings = request.app.state.settings
    return _download(job, JobFiles(settings.files_dir, job.id).report, "result", "report.csv")


routes = [
    Route("/v1/jobs/{job_id}", job_item, methods=["GET"], name="job"),
    Route("/v1/jobs/{job_id}/errors", job_errors, methods=["GET"], name="job_errors"),
    Route("/v1/jobs/{job_id}/result", job_result, methods=["GET"], name="job_result"),
]
