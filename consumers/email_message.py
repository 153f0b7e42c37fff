"""The email of one delivery: recipients taken from the subscription or the event, templates rendered in a sandbox.

Errors::

    EmailBuildError    the delivery cannot become an email (no recipient, a bad address, a template
                       that fails on this event); trying again will not help
"""

from __future__ import annotations

import functools
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from schemas.email import MAX_RECIPIENTS, parse_address

__all__ = ["EmailBuildError", "build_email", "message_id", "resolve_pointer"]

# Rendered text beyond this is refused, and so is arithmetic that would build it ("x" * 10**9).
_MAX_RENDERED_CHARS = 1024 * 1024
_MAX_SUBJECT_CHARS = 998


class EmailBuildError(Exception):
    """The delivery cannot become an email; the message says why, for the delivery's ``last_error``."""


class _Sandbox(SandboxedEnvironment):
    """Jinja2's sandbox (no attribute escapes, bounded ranges) that also refuses to multiply up huge values."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 100:
            raise jinja2.sandbox.SecurityError("exponent too large")
        if operator == "*":
            sizes = [len(v) for v in (left, right) if isinstance(v, str | list | tuple)]
            counts = [v for v in (left, right) if isinstance(v, int)]
            if sizes and counts and sizes[0] * max(counts[0], 0) > _MAX_RENDERED_CHARS:
                raise jinja2.sandbox.SecurityError("the result would be too large")
        return super().call_binop(context, operator, left, right)


# Undefined names fail loudly: a subject with a silent hole is worse than a dead delivery with the reason.
_TEXT = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False)
_HTML = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=True)


@functools.lru_cache(maxsize=512)
def _compiled(html: bool, source: str) -> jinja2.Template:
    return (_HTML if html else _TEXT).from_string(source)


def _render(part: str, source: str, event: dict[str, Any], *, html: bool = False) -> str:
    try:
        rendered = _compiled(html, source).render(event)
    except Exception as exc:  # Jinja2's errors, and a template's own expression failing ({{ 1 / data.zero }})
        raise EmailBuildError(f"the {part} template failed: {type(exc).__name__}: {exc}") from exc
    if len(rendered) > _MAX_RENDERED_CHARS:
        raise EmailBuildError(f"the {part} template rendered more than {_MAX_RENDERED_CHARS} characters")
    return rendered


def resolve_pointer(document: Any, pointer: str) -> Any:
    """The value at a JSON pointer (RFC 6901); KeyError if the document has nothing there."""
    value = document
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            raise KeyError(pointer)
    return value


def _recipients(to: list[str] | str, event: dict[str, Any]) -> list[str]:
    if isinstance(to, list):
        return to
    try:
        found = resolve_pointer(event, to)
    except KeyError:
        raise EmailBuildError(f"the event has no recipient at {to}") from None
    values = [found] if isinstance(found, str) else found
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise EmailBuildError(f"the event's {to} is not an address or a list of addresses")
    if len(values) > MAX_RECIPIENTS:
        raise EmailBuildError(f"the event's {to} lists {len(values)} addresses, over the limit of {MAX_RECIPIENTS}")
    try:
        return list(dict.fromkeys(parse_address(v) for v in values))
    except ValueError as exc:
        raise EmailBuildError(f"the event's {to}: {exc}") from exc


def message_id(delivery_id: str, sender: str) -> str:
    """The same on every attempt of a delivery, so mail systems and readers can tell a repeat."""
    return f"<{delivery_id}@{sender.rpartition('@')[2]}>"


def build_email(delivery_id: str, event: dict[str, Any], options: dict[str, Any]) -> EmailMessage:
    """The message for this delivery: ``options`` are the subscription's ``EmailOptions`` as stored."""
    template = options["template"]
    recipients = _recipients(options["to"], event)
    # A subject is one header line: whatever the event holds, newlines cannot add headers.
    subject = " ".join(_render("subject", template["subject"], event).split())[:_MAX_SUBJECT_CHARS]
    text = _render("text", template["text"], event)
    html = _render("html", template["html"], event, html=True) if template.get("html") else None
    message = EmailMessage()
    message["From"] = options["from"]
    message["To"] = ", ".join(recipients)
    if options.get("reply_to"):
        message["Reply-To"] = options["reply_to"]
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id(delivery_id, options["from"])
    # RFC 3834: sent by a machine, so auto-responders do not answer it.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message
