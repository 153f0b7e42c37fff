"""``GET /metrics``: the gateway's Prometheus metrics, for the admin scope unless made public."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.metrics import CONTENT_TYPE, render
from consumers.queue_stats import QueueDepthCollector
from gateway.auth import authenticate
from schemas.keys import Scope
from schemas.settings import Settings

__all__ = ["routes"]


async def metrics(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    # Counts and latencies tell an outsider how busy and how healthy the gateway is; scrapers that cannot
    # send a key get them only when the operator says so (HOOKGATE_METRICS_PUBLIC, behind a private network).
    if not settings.metrics_public:
        await authenticate(request, Scope.ADMIN)
    # Under PROMETHEUS_MULTIPROC_DIR this reads a file per process, and the queue depths ask the broker:
    # off the event loop.
    return Response(await asyncio.to_thread(render, QueueDepthCollector(settings)), media_type=CONTENT_TYPE)


routes = [Route("/metrics", metrics, methods=["GET"], name="metrics")]
