"""The HTTP side of a webhook send (and of a heavy job's download): checked targets, pinned addresses, no redirects.

Errors::

    UnsafeTargetError         (consumers.ssrf) the URL may not be called; nothing was sent
    WebhookTransportError     no response at all: timeout, refused, reset, TLS or protocol failure
     +-- DownloadTooLarge     a download went past its size limit
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import httpcore
import httpx

from consumers.ssrf import Target, TargetPolicy, check_target

__all__ = ["RESPONSE_EXCERPT_BYTES", "DownloadTooLarge", "WebhookClient", "WebhookResponse", "WebhookTransportError"]

# Enough of a response body to show an operator why an endpoint refused, without storing pages.
RESPONSE_EXCERPT_BYTES = 4096
# httpx's defaults: idle connections kept per client, and how long an idle one is kept.
_MAX_KEEPALIVE = 20
_KEEPALIVE_EXPIRY_S = 5.0


class WebhookTransportError(Exception):
    """The endpoint gave no HTTP response; the message names the httpcore error for the attempt log."""


class DownloadTooLarge(WebhookTransportError):
    """The body is larger than the download's limit; what was written is to be discarded."""


# Everything httpcore raises when no usable response came back (TLS failures arrive as ConnectError).
_TRANSPORT_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                     httpcore.UnsupportedProtocol)


@dataclass(frozen=True, slots=True)
class WebhookResponse:
    """An endpoint's answer: status, headers, and the first ``RESPONSE_EXCERPT_BYTES`` of the body."""

    status_code: int
    headers: dict[str, str]
    body_excerpt: str

    @property
    def ok(self) -> bool:
        """2xx only: a redirect is a failure, since following it could reach an unchecked host."""
        return 200 <= self.status_code < 300


class _PinnedBackend(httpcore.NetworkBackend):
    """Opens a connection to a host only at the addresses the SSRF guard checked for it.

    The pool names the host (so TLS sends it as SNI and verifies the certificate against it, and
    keep-alive connections are per host), but the socket goes to a checked IP: nothing here resolves
    a name, so a DNS answer that changes after the check (rebinding) is never used.
    """

    def __init__(self) -> None:
        self._sockets = httpcore.SyncBackend()
        self._pins: dict[tuple[str, int], tuple[str, ...]] = {}

    @contextmanager
    def pinned(self, target: Target) -> Iterator[None]:
        """Let the pool connect to the target's host, at its checked addresses, for one request."""
        key = (target.host, target.port)
        self._pins[key] = target.addresses
        try:
            yield
        finally:
            del self._pins[key]

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        addresses = self._pins.get((host, port))
        if not addresses:
            raise httpcore.ConnectError(f"{host}:{port} was not checked by the SSRF guard")
        # Each checked address in turn, as socket.create_connection tries each resolved one.
        for address in addresses[:-1]:
            try:
                return self._sockets.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                continue
        return self._sockets.connect_tcp(addresses[-1], port, timeout, local_address, socket_options)

    def sleep(self, seconds: float) -> None:
        self._sockets.sleep(seconds)


class WebhookClient:
    """One per sending thread: a pool's sockets must not be shared across a fork or between threads.

    It talks to httpcore's connection pool directly: httpx's client layer (cookies, auth, redirects,
    event hooks, environment proxies and .netrc) does nothing a webhook needs, must not apply to
    user-chosen URLs, and costs CPU on every send; redirects are thereby never followed. The URL is
    parsed once, by httpx, for both the SSRF check and the request.
    """

    def __init__(self, *, timeout_s: float, user_agent: str, policy: TargetPolicy,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._backend = _PinnedBackend()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context or _default_ssl_context(), max_keepalive_connections=_MAX_KEEPALIVE,
            keepalive_expiry=_KEEPALIVE_EXPIRY_S, network_backend=self._backend,
        )
        self._policy = policy
        self._extensions = {"timeout": httpx.Timeout(timeout_s).as_dict()}
        self._user_agent = user_agent.encode()

    def _request(self, method: bytes, target: Target, headers: list[tuple[bytes, bytes]],
                 content: bytes = b"") -> httpcore.Request:
        return httpcore.Request(
            method,
            httpcore.URL(scheme=target.url.raw_scheme, host=target.url.raw_host, port=target.url.port,
                         target=target.url.raw_path),
            # httpcore's Request adds no Host; netloc brackets IPv6 and keeps a port.
            headers=[(b"host", target.url.netloc), (b"user-agent", self._user_agent), *headers],
            content=content,
            extensions=self._extensions,
        )

    def download(self, url: str, sink: BinaryIO, max_bytes: int) -> tuple[int, int]:
        """GET a checked URL into ``sink``: ``(status, bytes written)``; only a 2xx body is written.

        Raises ``UnsafeTargetError`` (nothing fetched), ``DownloadTooLarge`` past ``max_bytes``, or
        ``WebhookTransportError``.
        """
        target = check_target(url, self._policy)
        request = self._request(b"GET", target, [(b"accept-encoding", b"identity")])
        written = 0
        try:
            with self._backend.pinned(target):
                response = self._pool.handle_request(request)
            try:
                if not 200 <= response.status < 300:
                    return response.status, 0
                for chunk in response.stream:  # type: ignore[union-attr]
                    written += len(chunk)
                    if written > max_bytes:
                        raise DownloadTooLarge(f"the file is larger than the limit of {max_bytes} bytes")
                    sink.write(chunk)
            finally:
                response.close()
        except _TRANSPORT_ERRORS as exc:
            raise WebhookTransportError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
        return response.status, written

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> WebhookResponse:
        """Check the URL, POST ``body`` to a checked address and read at most the excerpt of the answer.

        Raises ``UnsafeTargetError`` (nothing sent) or ``WebhookTransportError``.
        """
        target = check_target(url, self._policy)
        # httpcore's Request adds no Content-Length either.
        request = self._request(b"POST", target, [(b"content-length", b"%d" % len(body)),
                                                  *((k.encode(), v.encode()) for k, v in headers.items())], body)
        try:
            # The pool opens connections only inside handle_request; a kept-alive one was opened to an
            # address checked for an earlier request to the same host.
            with self._backend.pinned(target):
                response = self._pool.handle_request(request)
            try:
                excerpt = bytearray()
                for chunk in response.stream:  # type: ignore[union-attr]
                    excerpt += chunk
                    if len(excerpt) >= RESPONSE_EXCERPT_BYTES:
                        # Leaving the rest unread closes this connection instead of draining a big body.
                        break
            finally:
                response.close()
        except _TRANSPORT_ERRORS as exc:
            raise WebhookTransportError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
        return WebhookResponse(
            status_code=response.status,
            headers=_header_dict(response.headers),
            body_excerpt=excerpt[:RESPONSE_EXCERPT_BYTES].decode("utf-8", errors="replace"),
        )

    def close(self) -> None:
        self._pool.close()


_ssl_context_lock = threading.Lock()
_ssl_context: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    """httpx's context: certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR when set (a private CA).

    Loading the CAs costs ~90 ms of CPU, so the clients of a process share one context (it is
    thread-safe); made on first use, after the fork, once even when many sending threads start at once.
    """
    global _ssl_context
    with _ssl_context_lock:
        if _ssl_context is None:
            _ssl_context = httpx.create_ssl_context()
        return _ssl_context


def _header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-case names; repeated headers joined with ", ", as httpx shows them."""
    merged: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return merged
