"""The baseline: Starlette parsing a JSON POST and answering 202, publishing nothing."""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def accept(request: Request) -> Response:
    orjson.loads(await request.body())
    return Response(b'{"id":"x"}', status_code=202, media_type="application/json")


app = Starlette(routes=[Route("/v1/events", accept, methods=["POST"])])
