"""SMTP submission through the primary server or its fallback; smtplib's errors translated into retry-or-give-up.

Errors::

    SmtpError                  the message was not accepted
     +-- SmtpTransientError    no connection, a timeout, a failed greeting/TLS/login, or a 4xx reply: try later
     +-- SmtpPermanentError    a 5xx reply to the message (MAIL, RCPT or DATA): trying again will not help

Failures before the message is offered (connecting, EHLO, STARTTLS, AUTH) are the server's, not the
message's: they are transient, as is a 4xx reply, and each sends the message to the fallback server
if one is configured. A 5xx reply to the message is its own fault and goes nowhere else.
"""

from __future__ import annotations

import contextlib
import copy
import smtplib
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import getaddresses
from typing import Literal

from schemas.settings import Settings

__all__ = [
    "Mailer",
    "SmtpError",
    "SmtpPermanentError",
    "SmtpReply",
    "SmtpServer",
    "SmtpTransientError",
    "send_message",
]

_OK = frozenset({250, 251})


class SmtpError(Exception):
    """The message was not accepted; ``code`` and ``reply`` are the server's last answer, if any."""

    def __init__(self, detail: str, code: int | None = None, reply: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.reply = reply


class SmtpTransientError(SmtpError):
    """Try again later (or on the fallback server)."""


class SmtpPermanentError(SmtpError):
    """The server refused this message for good."""


@dataclass(frozen=True, slots=True)
class SmtpServer:
    host: str
    port: int
    security: Literal["none", "starttls", "tls"]
    timeout_s: float
    username: str = ""
    password: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """The server's answer to the message's data; ``refused`` holds recipients it turned down (code, text)."""

    code: int
    text: str
    server: str
    refused: dict[str, tuple[int, str]]
    duration_ms: float


def _error(detail: str, code: int, reply: bytes | str) -> SmtpError:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
    kind = SmtpPermanentError if 500 <= code < 600 else SmtpTransientError
    return kind(f"{detail}: {code} {text}", code, text)


class Mailer:
    """Sends an ``EmailMessage`` through ``primary``, and through ``fallback`` when the primary fails transiently."""

    def __init__(self, primary: SmtpServer, fallback: SmtpServer | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        self.primary = primary
        self.fallback = fallback
        # Made on first use and kept: loading the CA bundle costs tens of milliseconds of CPU, and smtplib
        # would look up this host's FQDN (DNS) on every connection.
        self._context = context
        self._local_hostname: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Mailer:
        primary = SmtpServer(settings.smtp_host, settings.smtp_port, settings.smtp_security, settings.smtp_timeout_s,
                             settings.smtp_username, settings.smtp_password)
        fallback = SmtpServer(
            settings.smtp_fallback_host, settings.smtp_fallback_port, settings.smtp_fallback_security,
            settings.smtp_fallback_timeout_s, settings.smtp_fallback_username, settings.smtp_fallback_password,
        ) if settings.smtp_fallback_host else None
        return cls(primary, fallback)

    def send(self, message: EmailMessage) -> SmtpReply:
        """Send to the envelope recipients of To, Cc and Bcc; raise SmtpError if no server accepted it."""
        sender = message["Sender"] or message["From"]
        recipients = [address for _, address in getaddresses(
            [str(value) for name in ("To", "Cc", "Bcc") for value in message.get_all(name, [])])]
        if not sender or not recipients:
            raise SmtpPermanentError("the message has no sender or no recipients")
        envelope_from = getaddresses([str(sender)])[0][1]
        # Bcc stays off the wire (as smtplib.send_message does).
        data = message.as_bytes(policy=SMTP_POLICY) if "Bcc" not in message else _without_bcc(message)
        try:
            return self._send_via(self.primary, envelope_from, recipients, data)
        except SmtpTransientError as primary_failure:
            if self.fallback is None:
                raise
            try:
                return self._send_via(self.fallback, envelope_from, recipients, data)
            except SmtpError as fallback_failure:
                raise type(fallback_failure)(
                    f"{fallback_failure} (after the primary server {self.primary.name}: {primary_failure})",
                    fallback_failure.code, fallback_failure.reply,
                ) from fallback_failure

    def _send_via(self, server: SmtpServer, sender: str, recipients: Sequence[str], data: bytes) -> SmtpReply:
        started = time.perf_counter()
        try:
            smtp = self._connect(server)
            try:
                return self._transaction(smtp, server, sender, recipients, data, started)
            finally:
                _quit(smtp)
        except SmtpError:
            raise
        except smtplib.SMTPNotSupportedError as exc:
            raise SmtpPermanentError(f"{server.name} cannot take this message: {exc}") from exc
        except smtplib.SMTPResponseException as exc:
            # Refused before the message was offered (greeting, STARTTLS, AUTH): the server's trouble.
            raise SmtpTransientError(f"{server.name} refused the session: {exc.smtp_code} "
                                     f"{exc.smtp_error.decode(errors='replace')}", exc.smtp_code) from exc
        except (smtplib.SMTPException, OSError) as exc:  # no connection, a timeout, a TLS failure, a hang-up
            raise SmtpTransientError(f"{server.name} unreachable: {type(exc).__name__}: {exc}") from exc

    def _tls_context(self) -> ssl.SSLContext:
        if self._context is None:
            # Verifies certificates against the system's CAs (or SSL_CERT_FILE's).
            self._context = ssl.create_default_context()
        return self._context

    def _connect(self, server: SmtpServer) -> smtplib.SMTP:
        if self._local_hostname is None:
            self._local_hostname = socket.getfqdn()
        smtp: smtplib.SMTP
        if server.security == "tls":
            smtp = smtplib.SMTP_SSL(server.host, server.port, local_hostname=self._local_hostname,
                                    timeout=server.timeout_s, context=self._tls_context())
        else:
            smtp = smtplib.SMTP(server.host, server.port, local_hostname=self._local_hostname,
                                timeout=server.timeout_s)
        try:
            smtp.ehlo()
            if server.security == "starttls":
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            if server.username:
                smtp.login(server.username, server.password)
        except BaseException:
            smtp.close()
            raise
        return smtp

    @staticmethod
    def _transaction(smtp: smtplib.SMTP, server: SmtpServer, sender: str, recipients: Sequence[str], data: bytes,
                     started: float) -> SmtpReply:
        code, reply = smtp.mail(sender)
        if code not in _OK:
            raise _error(f"{server.name} refused the sender", code, reply)
        refused: dict[str, tuple[int, str]] = {}
        for recipient in recipients:
            code, reply = smtp.rcpt(recipient)
            if code not in _OK:
                refused[recipient] = (code, reply.decode(errors="replace"))
        if len(refused) == len(recipients):
            # Every recipient refused: permanent only when none of the refusals may pass.
            code, text = max(refused.values(), key=lambda answer: answer[0] < 500)
            raise _error(f"{server.name} refused every recipient", code, text)
        code, reply = smtp.data(data)
        if code != 250:
            raise _error(f"{server.name} refused the message", code, reply)
        return SmtpReply(code, reply.decode(errors="replace"), server.name, refused,
                         (time.perf_counter() - started) * 1000)


def _quit(smtp: smtplib.SMTP) -> None:
    # Once the data is accepted the message is sent: whatever QUIT answers must not undo that.
    with contextlib.suppress(smtplib.SMTPException, OSError):
        smtp.quit()
    smtp.close()


def _without_bcc(message: EmailMessage) -> bytes:
    stripped = copy.deepcopy(message)
    del stripped["Bcc"]
    return stripped.as_bytes(policy=SMTP_POLICY)


def send_message(message: EmailMessage, settings: Settings) -> SmtpReply:
    """Send a built message through the configured primary SMTP server, or the fallback if it fails transiently.

    The one entry point for code outside the email channel (reports with attachments, say). Raises
    ``SmtpTransientError`` (retry later) or ``SmtpPermanentError`` (give up).
    """
    return Mailer.from_settings(settings).send(message)
