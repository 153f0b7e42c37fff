"""Request ids: ``X-Request-ID`` taken or made, bound to the log context and put on every response."""

from __future__ import annotations

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.problems import problem_response
from schemas.ids import new_id

__all__ = ["REQUEST_ID_HEADER", "RequestId"]

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER = REQUEST_ID_HEADER.lower().encode()
_MAX_LENGTH = 200


def _given_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _HEADER:
            # An id a client chose ends up in log lines: refuse what could forge or break one.
            if 0 < len(value) <= _MAX_LENGTH and value.isascii():
                text = value.decode()
                if text.isprintable():
                    return text
            return None
    return None


class RequestId:
    """Pure ASGI, outermost, so that problems answered by inner middleware (413) carry the id too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _given_id(scope) or new_id()
        header = (_HEADER, request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # A new list: a response object's own header list may be sent more than once.
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        # Cleared first: in-process callers (tests, ASGI transports) share one context with the app.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette answers unhandled errors outside every middleware; answer here so the 500 has the id.
            # Its handler still logs the error (with the id: the context stays bound for it) and, the
            # response being started, sends nothing more.
            if not started:
                await problem_response(500, "an unexpected error occurred; it has been logged")(
                    scope, receive, send_with_id
                )
            raise
        structlog.contextvars.clear_contextvars()
