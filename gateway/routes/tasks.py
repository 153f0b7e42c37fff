"""``GET /v1/tasks/{task_id}``: a Celery task's state and result, from the persistent result backend."""

from __future__ import annotations

import asyncio
import re

from celery import Celery
from celery.result import AsyncResult
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.store.errors import translate_errors
from gateway.auth import authenticate
from gateway.problems import Problem
from gateway.routes._json import model_response
from schemas.jobs import TaskOut
from schemas.keys import Scope

__all__ = ["routes"]

# Celery task ids are UUIDs; anything of that shape is looked up, anything else refused before.
_TASK_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_ERROR_STATES = frozenset({"FAILURE", "RETRY", "REVOKED"})


def _read(celery: Celery, task_id: str) -> TaskOut:
    result = AsyncResult(task_id, app=celery)
    with translate_errors("reading a task result"):
        meta = result.backend.get_task_meta(task_id)
    state = str(meta["status"])
    info = meta.get("result")
    error = None
    if state in _ERROR_STATES:
        # The backend hands the exception back rebuilt (or its name and message, for types it cannot import).
        if isinstance(info, BaseException):
            error = f"{type(info).__name__}: {info}"
        elif isinstance(info, dict):
            error = f"{info.get('exc_type')}: {info.get('exc_message')}"
        else:
            error = None if info is None else str(info)
        info = None
    return TaskOut(task_id=task_id, state=state, name=meta.get("name"), queue=meta.get("queue"), result=info,
                   error=error, date_done=meta.get("date_done"))


async def task_item(request: Request) -> Response:
    await authenticate(request, Scope.EVENTS_READ)
    task_id = request.path_params["task_id"]
    if not _TASK_ID.match(task_id):
        raise Problem(404, f"there is no task {task_id!r}: task ids are letters, digits, - and _")
    return model_response(await asyncio.to_thread(_read, request.app.state.celery, task_id))


routes = [Route("/v1/tasks/{task_id}", task_item, methods=["GET"], name="task")]
