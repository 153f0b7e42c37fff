"""A real SMTP server for tests: aiosmtpd on loopback, keeping what it accepted and answering as scripted.

Usage::

    with SmtpSink() as smtp:                      # listens on 127.0.0.1:smtp.port
        smtp.script("451 4.3.0 try again later")  # the next DATA gets this answer, then 250s again
        ...send mail through it...
        smtp.wait_for(1)                          # the messages it accepted, parsed

A message counts as accepted only once the server has answered its DATA with 250, as an MTA takes
responsibility: with ``stall_s`` set, a client that hangs up (or is killed) while the server waits
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller

from tests.workers import free_port

__all__ = ["Received", "SmtpSink"]


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if address in self.sink.refused_recipients:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sink = self.sink
        with sink.lock:
            reply = sink.replies.popleft() if sink.replies else None
            sink.data_commands += 1
        if sink.stall_s:
            # A killed client closes the connection: aiosmtpd cancels this coroutine, and nothing is kept.
            await asyncio.sleep(sink.stall_s)
        if reply is not None:
            return reply
        parsed = message_from_bytes(envelope.original_content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        with sink.lock:
            sink.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 2.0.0 Ok: queued"


class SmtpSink:
    """aiosmtpd's Controller on a free loopback port; ``received`` holds the accepted messages in order."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, **smtp_options: Any) -> None:
        """``ssl_context`` makes it SMTPS (TLS from the first byte); ``smtp_options`` go to aiosmtpd's SMTP
        (``tls_context`` and ``require_starttls`` for STARTTLS, ``authenticator`` and ``auth_required``)."""
        self.port = free_port()
        self.refused_recipients: set[str] = set()
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.replies: deque[str] = deque()
        self.data_commands = 0
        self.stall_s = 0.0
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port, ssl_context=ssl_context,
                                      **smtp_options)

    def script(self, *replies: str) -> None:
        """Answer the next DATA commands with these replies instead of accepting."""
        with self.lock:
            self.replies.extend(replies)

    def messages_to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [r.message for r in self.received if address in r.rcpt_tos]

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[Received]:
        """Wait until at least ``count`` messages were accepted; all accepted so far."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            if time.monotonic() > deadline:
                raise AssertionError(f"the SMTP server accepted {len(self.received)} messages, not {count}")
            time.sleep(0.05)

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._controller.stop()
