"""``/healthz`` (the process answers) and ``/readyz`` (the broker and the store answer too)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from consumers.store.errors import StoreError
from consumers.store.queries import ping
from gateway.problems import Problem

__all__ = ["routes"]

# A load balancer's probe gives up after a few seconds; answer before it does.
_STORE_PING_TIMEOUT_S = 2.0
_RETRY_AFTER_S = 5


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _store_is_up(request: Request) -> bool:
    try:
        async with asyncio.timeout(_STORE_PING_TIMEOUT_S):
            await asyncio.to_thread(ping, request.app.state.read_sessions)
    except (StoreError, TimeoutError):
        return False
    return True


async def readyz(request: Request) -> Response:
    checks = {
        "broker": "up" if request.app.state.publisher.connected else "down",
        "store": "up" if await _store_is_up(request) else "down",
    }
    down = [name for name, state in checks.items() if state == "down"]
    if down:
        raise Problem(
            503,
            f"not ready: the {' and the '.join(down)} {'is' if len(down) == 1 else 'are'} down",
            headers={"Retry-After": str(_RETRY_AFTER_S)},
            checks=checks,
        )
    return JSONResponse({"status": "ready", "checks": checks})


routes = [
    Route("/healthz", healthz, methods=["GET"], name="healthz"),
    Route("/readyz", readyz, methods=["GET"], name="readyz"),
]
