"""The HTTP side of a webhook send: a keep-alive httpx transport that never follows redirects.

Errors::

    WebhookTransportError     no response at all: timeout, refused, reset, TLS or protocol failure
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx

__all__ = ["RESPONSE_EXCERPT_BYTES", "WebhookClient", "WebhookResponse", "WebhookTransportError"]

# Enough of a response body to show an operator why an endpoint refused, without storing pages.
RESPONSE_EXCERPT_BYTES = 4096


class WebhookTransportError(Exception):
    """The endpoint gave no HTTP response; the message names the httpx error for the attempt log."""


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


class WebhookClient:
    """One per worker process: the pool's sockets must not be shared across a fork.

    It talks to httpx's transport directly: the client layer (cookies, auth, redirects, event hooks)
    does nothing a webhook needs and costs a third of the CPU of a send; redirects are thereby never
    followed.
    """

    def __init__(self, *, timeout_s: float, user_agent: str) -> None:
        # Environment proxies and .netrc credentials must never apply to user-chosen URLs, so no trust_env.
        self._transport = httpx.HTTPTransport()
        self._extensions = {"timeout": httpx.Timeout(timeout_s).as_dict()}
        self._user_agent = user_agent

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> WebhookResponse:
        """POST ``body`` and read at most the excerpt of the answer; raises WebhookTransportError."""
        try:
            request = httpx.Request("POST", url, headers={"user-agent": self._user_agent, **headers}, content=body,
                                    extensions=self._extensions)
            response = self._transport.handle_request(request)
            try:
                excerpt = bytearray()
                for chunk in response.stream:
                    excerpt += chunk
                    if len(excerpt) >= RESPONSE_EXCERPT_BYTES:
                        # Leaving the rest unread closes this connection instead of draining a big body.
                        break
            finally:
                response.close()
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise WebhookTransportError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
        return WebhookResponse(
            status_code=response.status_code,
            headers=dict(response.headers),
            body_excerpt=excerpt[:RESPONSE_EXCERPT_BYTES].decode("utf-8", errors="replace"),
        )

    def close(self) -> None:
        self._transport.close()
