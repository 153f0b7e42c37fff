"""The SMTP client (consumers/smtp.py) against real aiosmtpd servers: security modes, login, replies, fallback."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from consumers.smtp import Mailer, SmtpPermanentError, SmtpServer, SmtpTransientError, send_message
from schemas.settings import Settings
from tests.smtpserver import SmtpSink
from tests.workers import free_port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


def _server(port: int, security: Any = "none", **login: str) -> SmtpServer:
    return SmtpServer("127.0.0.1", port, security, 5.0, **login)


def _message(to: str = "ada@example.com", **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "shop@example.com"
    message["To"] = to
    message["Subject"] = "Hello"
    for name, value in headers.items():
        message[name] = value
    message.set_content("Hello Ada.")
    return message


class _Authenticator:
    """Accepts one user and password, over TLS only (aiosmtpd's default)."""

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"shop", b"s3cret")
        return AuthResult(success=ok)


def test_plain_smtp_sends_and_reports_the_servers_reply(smtp: SmtpSink) -> None:
    """Without security the message arrives and the 250 reply, the server's name and the duration come back."""
    reply = Mailer(_server(smtp.port)).send(_message())

    assert (reply.code, reply.server, reply.refused) == (250, f"127.0.0.1:{smtp.port}", {})
    assert "Ok: queued" in reply.text and reply.duration_ms > 0
    (received,) = smtp.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == ("shop@example.com", ["ada@example.com"])


def test_starttls_with_login_verifies_the_certificate(server_context: ssl.SSLContext,
                                                      client_context: ssl.SSLContext) -> None:
    """STARTTLS upgrades the session, the certificate is verified against its CA, then AUTH succeeds."""
    with SmtpSink(tls_context=server_context, require_starttls=True, authenticator=_Authenticator(),
                  auth_required=True) as sink:
        Mailer(_server(sink.port, "starttls", username="shop", password="s3cret"), context=client_context) \
            .send(_message())
        assert len(sink.wait_for(1)) == 1
        # The system's CAs do not know this test CA: the connection is refused before anything is sent.
        with pytest.raises(SmtpTransientError, match="CERTIFICATE_VERIFY_FAILED"):
            Mailer(_server(sink.port, "starttls", username="shop", password="s3cret")).send(_message())
        assert len(sink.received) == 1


def test_implicit_tls_sends(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> None:
    """`tls` speaks TLS from the first byte (SMTPS) and sends."""
    with SmtpSink(ssl_context=server_context) as sink:
        assert Mailer(_server(sink.port, "tls"), context=client_context).send(_message()).code == 250
        assert len(sink.wait_for(1)) == 1


@pytest.mark.parametrize(("reply", "error"), [("451 4.3.0 Try later", SmtpTransientError),
                                              ("552 5.3.4 Too big", SmtpPermanentError)])
def test_a_refused_message_raises_by_reply_class(smtp: SmtpSink, reply: str, error: type[Exception]) -> None:
    """A 4xx reply to the data is transient, a 5xx permanent; the code and text travel with the error."""
    smtp.script(reply)
    with pytest.raises(error, match=re.escape(reply)) as caught:
        Mailer(_server(smtp.port)).send(_message())

    assert getattr(caught.value, "code", None) == int(reply[:3])


def test_the_fallback_takes_a_transient_failure_but_not_a_permanent_one(smtp: SmtpSink) -> None:
    """A 451 from the primary sends through the fallback; a 550 from the primary is final and the fallback
    never sees the message."""
    with SmtpSink() as fallback:
        mailer = Mailer(_server(smtp.port), _server(fallback.port))
        smtp.script("451 4.3.0 Try later")
        assert mailer.send(_message()).server == f"127.0.0.1:{fallback.port}"
        smtp.script("550 5.7.1 Rejected")
        with pytest.raises(SmtpPermanentError, match=r"550 5\.7\.1 Rejected"):
            mailer.send(_message())
        assert (len(smtp.received), len(fallback.received)) == (0, 1)


def test_an_unreachable_server_is_transient() -> None:
    """Nothing listening is a transient error naming the server."""
    port = free_port()
    with pytest.raises(SmtpTransientError, match=f"127.0.0.1:{port} unreachable: ConnectionRefusedError"):
        Mailer(_server(port)).send(_message())


def test_refused_recipients_are_reported_and_all_refused_is_an_error(smtp: SmtpSink) -> None:
    """The message goes to the recipients the server took and names the refused; all refused raises."""
    smtp.refused_recipients = {"gone@example.com"}
    reply = Mailer(_server(smtp.port)).send(_message(to="ada@example.com, gone@example.com"))

    assert reply.refused == {"gone@example.com": (550, "5.1.1 No such user")}
    assert smtp.wait_for(1)[0].rcpt_tos == ["ada@example.com"]
    with pytest.raises(SmtpPermanentError, match="refused every recipient: 550"):
        Mailer(_server(smtp.port)).send(_message(to="gone@example.com"))


def test_send_message_uses_the_settings_and_keeps_bcc_off_the_wire(smtp: SmtpSink) -> None:
    """send_message, the entry point for other code, sends a built message with an attachment through the
    configured server; Bcc recipients get it without the header appearing."""
    message = _message(Bcc="audit@example.com")
    message.add_attachment(b"%PDF-1.4 report", maintype="application", subtype="pdf", filename="report.pdf")
    reply = send_message(message, Settings(smtp_host="127.0.0.1", smtp_port=smtp.port))

    assert reply.code == 250
    (received,) = smtp.wait_for(1)
    assert received.rcpt_tos == ["ada@example.com", "audit@example.com"]
    assert "Bcc" not in received.message
    (attachment,) = received.message.iter_attachments()
    assert (attachment.get_filename(), attachment.get_content()) == ("report.pdf", b"%PDF-1.4 report")
