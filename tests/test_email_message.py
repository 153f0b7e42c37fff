"""Building a delivery's email (consumers/email_message.py): recipients, rendering, the sandbox and its limits."""

from __future__ import annotations

from typing import Any

import pytest

from consumers.email_message import EmailBuildError, build_email, resolve_pointer
from schemas.subscriptions import SubscriptionCreate

EVENT: dict[str, Any] = {"id": "ev-1", "source": "shop", "type": "order.paid", "specversion": "1.0",
                         "data": {"order_id": 7, "customer": {"email": "ada@example.com", "name": "Ada"},
                                  "team": ["a@example.com", "b@example.com", "a@example.com"],
                                  "a/b": {"~x": "tilde@example.com"}}}


def _options(**fields: Any) -> dict[str, Any]:
    body = {"channel": "email", "event_types": ["order.*"], "to": "/data/customer/email", "from": "shop@example.com",
            "template": {"subject": "Order {{ data.order_id }}", "text": "Hi {{ data.customer.name }}"}, **fields}
    return SubscriptionCreate.model_validate(body).options


def test_the_message_has_headers_parts_and_a_stable_message_id() -> None:
    """From, To, Subject, Auto-Submitted and a Message-ID from the delivery id; text only without an html template."""
    message = build_email("d-1", EVENT, _options())

    assert (message["From"], message["To"], message["Subject"]) == ("shop@example.com", "ada@example.com", "Order 7")
    assert message["Message-ID"] == "<d-1@example.com>"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "text/plain" and message.get_content().strip() == "Hi Ada"
    assert build_email("d-1", EVENT, _options())["Message-ID"] == message["Message-ID"]


@pytest.mark.parametrize(("pointer", "expected"), [
    ("/data/team", "a@example.com, b@example.com"),
    ("/data/team/1", "b@example.com"),
    ("/data/a~1b/~0x", "tilde@example.com"),
])
def test_a_pointer_names_an_address_or_a_list_of_them(pointer: str, expected: str) -> None:
    """JSON pointers follow RFC 6901 (array indexes, ~0 and ~1 escapes); repeated addresses are sent to once."""
    assert build_email("d", EVENT, _options(to=pointer))["To"] == expected


@pytest.mark.parametrize(("pointer", "reason"), [
    ("/data/nothing", "the event has no recipient at /data/nothing"),
    ("/data/order_id", "is not an address or a list of addresses"),
    ("/data/team/9", "the event has no recipient"),
    ("/data/customer/name", "is not an email address"),
])
def test_a_pointer_that_finds_no_address_cannot_build(pointer: str, reason: str) -> None:
    """A pointer to nothing, to a number, past a list's end or to a non-address is a build error with the reason."""
    with pytest.raises(EmailBuildError, match=reason):
        build_email("d", EVENT, _options(to=pointer))


def test_html_is_autoescaped_and_the_subject_stays_one_header() -> None:
    """Event data is escaped in the HTML part, raw in the text part, and newlines cannot add headers."""
    event = {**EVENT, "data": {**EVENT["data"], "order_id": "7\r\nBcc: victim@example.com",
                               "customer": {"email": "ada@example.com", "name": "<script>x</script>"}}}
    message = build_email("d", event, _options(template={"subject": "Order {{ data.order_id }}",
                                                         "text": "{{ data.customer.name }}",
                                                         "html": "<p>{{ data.customer.name }}</p>"}))

    assert message["Subject"] == "Order 7 Bcc: victim@example.com"
    assert "Bcc" not in message
    html, text = message.get_body(("html",)), message.get_body(("plain",))
    assert html is not None and text is not None
    assert html.get_content().strip() == "<p>&lt;script&gt;x&lt;/script&gt;</p>"
    assert text.get_content().strip() == "<script>x</script>"


@pytest.mark.parametrize(("text", "reason"), [
    ("{{ ''.__class__.__mro__ }}", "SecurityError|UndefinedError"),
    ("{{ 'x' * 100000000 }}", "SecurityError: the result would be too large"),
    ("{{ 2 ** 100000 }}", "SecurityError: exponent too large"),
    ("{{ data.customer.missing }}", "UndefinedError"),
    ("{{ data.customer.name.nope() }}", "the text template failed"),
])
def test_the_sandbox_refuses_escapes_and_huge_results(text: str, reason: str) -> None:
    """Attribute escapes, oversized string products, huge powers and undefined names fail the build instead of
    running or rendering holes."""
    with pytest.raises(EmailBuildError, match=reason):
        build_email("d", EVENT, _options(template={"subject": "s", "text": text}))


def test_resolve_pointer_walks_objects_and_arrays() -> None:
    """A pointer walks nested objects; one that goes on past a string raises KeyError."""
    assert resolve_pointer(EVENT, "/data/customer/name") == "Ada"
    with pytest.raises(KeyError):
        resolve_pointer(EVENT, "/data/customer/name/0")
