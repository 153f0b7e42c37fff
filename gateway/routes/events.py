"""``GET /v1/events/{id}``: a stored event with its deliveries and every attempt."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.store.queries import AmbiguousEventError, find_event
from gateway.auth import authenticate
from gateway.problems import Problem
from gateway.routes._json import model_response
from schemas.keys import Scope

__all__ = ["routes"]


async def event_detail(request: Request) -> Response:
    await authenticate(request, Scope.EVENTS_READ)
    event_id: str = request.path_params["event_id"]
    source = request.query_params.get("source")
    try:
        found = await asyncio.to_thread(find_event, request.app.state.read_sessions, event_id, source=source)
    except AmbiguousEventError as exc:
        raise Problem(
            409,
            f"several events have the id {event_id!r}; name one with ?source=",
            sources=exc.sources,
        ) from exc
    if found is None:
        where = f" from source {source!r}" if source is not None else ""
        raise Problem(404, f"there is no event {event_id!r}{where}")
    return model_response(found)


# `path` lets ids that contain '/' (they are any string in CloudEvents) be asked for URL-encoded.
routes = [Route("/v1/events/{event_id:path}", event_detail, methods=["GET"], name="event")]
