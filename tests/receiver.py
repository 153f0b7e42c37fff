"""A real webhook receiver for tests: uvicorn on a free loopback port, verifying every signature.

Usage::

    with Receiver(secret, script=[503, 503]) as receiver:   # two 503s, then the default 200
        ...subscribe receiver.url, send events...
        received = receiver.wait_for(3, timeout_s=10)
        assert all(r.verified for r in received)

``host``/``port`` choose the listening address (any 127.x.y.z is loopback on Linux, so two
receivers may share a port); ``tls=(certfile, keyfile)`` serves HTTPS, and ``name`` is the host
put in ``base_url`` (e.g. the name the certificate is for).

Every request on any path is answered and kept in ``receiver.ledger`` with whether its Standard
Webhooks signature verified (by the ``standardwebhooks`` reference library). Replies come from
``script`` in order, then ``default``; a reply is a status code or a :class:`Reply` with headers,
body and a delay. The server runs in a thread with its own event loop (uvloop, httptools).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
import uvicorn
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["Received", "Receiver", "Reply", "make_secret"]


def make_secret() -> str:
    """A fresh ``whsec_`` signing secret (24 random bytes)."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@dataclass(frozen=True)
class Reply:
    """One scripted answer: status, headers, body, and how long to wait before sending it."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request as it arrived; ``error`` says why the signature did not verify."""

    webhook_id: str | None
    verified: bool
    error: str | None
    path: str
    headers: dict[str, str]
    body: bytes
    # time.monotonic() on arrival, for measuring gaps between attempts.
    at: float
    status: int
    # The client's (address, port): one port for several requests means one kept-alive connection.
    peer: tuple[str, int] | None = None

    def json(self) -> Any:
        return orjson.loads(self.body)


class Receiver:
    """A signature-verifying HTTP endpoint with a ledger; use it as a context manager."""

    def __init__(self, secret: str, *, script: Iterable[int | Reply] = (), default: int | Reply = 200,
                 path: str = "/hook", host: str = "127.0.0.1", port: int = 0, tls: tuple[str, str] | None = None,
                 name: str | None = None) -> None:
        self._webhook = Webhook(secret)
        self._script: deque[Reply] = deque(_reply(r) for r in script)
        self._default = _reply(default)
        self._path = path
        # A fixed port lets a second receiver take over the first one's URL (a receiver down, then back).
        self._address = (host, port)
        self._tls = tls
        self._name = name or host
        self._ledger: list[Received] = []
        self._changed = threading.Condition()
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""
        self.port = 0

    @property
    def url(self) -> str:
        """The webhook URL to subscribe (``base_url`` + ``path``)."""
        return self.base_url + self._path

    @property
    def ledger(self) -> list[Received]:
        """A snapshot of every request so far, in arrival order."""
        with self._changed:
            return list(self._ledger)

    def respond(self, *replies: int | Reply) -> None:
        """Queue more scripted replies after those still pending."""
        with self._changed:
            self._script.extend(_reply(r) for r in replies)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        """Block until at least ``count`` requests arrived; fail the test with the ledger if not."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self._ledger) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(r.webhook_id, r.status, r.verified) for r in self._ledger]
                    raise AssertionError(f"expected {count} requests within {timeout_s} s, got {len(seen)}: {seen}")
                self._changed.wait(remaining)
            return list(self._ledger)

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        try:
            self._webhook.verify(body, headers, json_parse=False)
            verified, error = True, None
        except (WebhookVerificationError, ValueError) as exc:
            verified, error = False, f"{type(exc).__name__}: {exc}"
        with self._changed:
            reply = self._script.popleft() if self._script else self._default
            self._ledger.append(Received(
                webhook_id=headers.get("webhook-id"), verified=verified, error=error, path=request.url.path,
                headers=headers, body=body, at=time.monotonic(), status=reply.status,
                peer=(request.client.host, request.client.port) if request.client else None,
            ))
            self._changed.notify_all()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return Response(reply.body, status_code=reply.status, headers=dict(reply.headers))

    def __enter__(self) -> Receiver:
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST", "PUT"])])
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(self._address)
        self.port = self._socket.getsockname()[1]
        self.base_url = f"{'https' if self._tls else 'http'}://{self._name}:{self.port}"
        certfile, keyfile = self._tls or (None, None)
        config = uvicorn.Config(app, loop="uvloop", http="httptools", ws="none", lifespan="off",
                                log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                                ssl_certfile=certfile, ssl_keyfile=keyfile)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="receiver", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()


def _reply(value: int | Reply) -> Reply:
    return value if isinstance(value, Reply) else Reply(status=value)
