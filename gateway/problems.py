"""RFC 9457 problem details: the one shape of every error the HTTP API answers with."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, ExceptionHandler, Message, Receive, Scope, Send

from consumers.store.errors import StoreError

__all__ = ["PROBLEM_MEDIA_TYPE", "BodyLimit", "Problem", "exception_handlers", "problem_response"]

log = structlog.get_logger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
_STORE_RETRY_AFTER_S = 5


class Problem(Exception):
    """An error answered as a problem body; raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        type: str = "about:blank",
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title or HTTPStatus(status).phrase
        self.detail = detail
        self.type = type
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> Response:
        return problem_response(
            self.status, self.detail, title=self.title, type=self.type, headers=self.headers, **self.extra
        )


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    type: str = "about:blank",
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    """An ``application/problem+json`` response; ``extra`` members (e.g. ``errors``) join the body."""
    body = {"type": type, "title": title or HTTPStatus(status).phrase, "status": status, "detail": detail, **extra}
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _http_detail(request: Request, exc: HTTPException) -> str:
    if exc.status_code == 404:
        return f"there is nothing at {request.url.path}"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    return exc.detail


def _too_large_detail(max_bytes: int) -> str:
    return f"the request body is larger than the limit of {max_bytes} bytes"


async def _on_problem(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem_response(exc.status_code, _http_detail(request, exc), headers=exc.headers)


async def _on_store_error(request: Request, exc: Exception) -> Response:
    log.error("store_unavailable", method=request.method, path=request.url.path, error=str(exc))
    return problem_response(
        503,
        "the store is unavailable; try again later",
        headers={"Retry-After": str(_STORE_RETRY_AFTER_S)},
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # Logged with the route but never the body: bodies carry payloads and secrets.
    log.error("unhandled_error", method=request.method, path=request.url.path, exc_info=exc)
    return problem_response(500, "an unexpected error occurred; it has been logged")


def exception_handlers() -> dict[Any, ExceptionHandler]:
    """The handlers to pass to ``Starlette(exception_handlers=...)``."""
    return {
        Problem: _on_problem,
        HTTPException: _on_http_exception,
        StoreError: _on_store_error,
        Exception: _on_unexpected,
    }


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413), or not complete within ``timeout_s`` (408), with a problem.

    Starlette's own ``max_body_size`` answers a declared ``Content-Length`` over the limit in
    plain text, whatever the handlers say, so the limit is enforced here instead (pure ASGI). The
    deadline runs from the start of the request until its last body chunk: a client that trickles
    its body (slow-loris) is cut off. The request's head has its own deadline in the server
    (``gateway.httpserver``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None,
                 paths: Mapping[str, tuple[int, float | None]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        # Paths with limits of their own for requests with a query string (file uploads: POST
        # /v1/files?kind=...): (max_bytes, timeout_s). The path's JSON form keeps the ordinary limits.
        self.paths = dict(paths or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ordinary = (self.max_bytes, self.timeout_s)
        max_bytes, timeout_s = self.paths.get(scope["path"], ordinary) if scope.get("query_string") else ordinary
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            await problem_response(413, _too_large_detail(max_bytes))(scope, receive, send)
            return
        # Counted whether or not a Content-Length was declared: chunked bodies have none.
        await self.app(scope, self._guarded(receive, max_bytes, timeout_s), send)

    def _guarded(self, receive: Receive, max_bytes: int, timeout_s: float | None) -> Receive:
        received = 0
        complete = False
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

        async def receive_guarded() -> Message:
            nonlocal received, complete
            if complete or deadline is None:
                return await receive()  # after the body: waiting for a disconnect has no deadline
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise Problem(408, f"the request body did not arrive within {timeout_s:g} s",
                              headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise Problem(413, _too_large_detail(max_bytes))
            return message

        return receive_guarded


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
