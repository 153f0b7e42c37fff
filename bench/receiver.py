"""A fast webhook receiver for the benchmark: a bare ASGI app that answers 200 and logs arrivals."""

from __future__ import annotations

import asyncio
import os
import time

import orjson

# One unbuffered append per request: the ledger is complete whenever the benchmark reads it.
_LEDGER = os.open(os.environ["BENCH_LEDGER"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
_DELAY_S = float(os.environ.get("BENCH_DELAY_S", "0"))


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    arrived_ns = time.time_ns()
    headers = dict(scope["headers"])
    sent_ns = orjson.loads(body)["data"].get("sent_ns", 0)
    os.write(_LEDGER, b"%s %d %d\n" % (headers.get(b"webhook-id", b"-"), sent_ns, arrived_ns))
    if _DELAY_S:
        await asyncio.sleep(_DELAY_S)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
