"""``GET /v1/queues``: messages ready and unacknowledged, and consumers, of every hookgate queue."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.queue_stats import BrokerStatsUnavailable, queue_stats
from gateway.auth import authenticate
from gateway.problems import Problem
from gateway.routes._json import model_response
from schemas.jobs import QueuesOut
from schemas.keys import Scope
from schemas.settings import Settings

__all__ = ["routes"]


async def queue_collection(request: Request) -> Response:
    await authenticate(request, Scope.ADMIN)
    settings: Settings = request.app.state.settings
    try:
        items = await asyncio.to_thread(queue_stats, settings)
    except BrokerStatsUnavailable as exc:
        raise Problem(503, f"{exc}; try again later",
                      headers={"Retry-After": str(settings.broker_retry_after_s)}) from exc
    return model_response(QueuesOut(items=items))


routes = [Route("/v1/queues", queue_collection, methods=["GET"], name="queues")]
