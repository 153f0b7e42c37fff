"""Email subscriptions: who gets the message, who sends it, and the Jinja2 templates it is made from."""

from __future__ import annotations

import re

import jinja2
from email_validator import EmailNotValidError, validate_email
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["MAX_RECIPIENTS", "EmailOptions", "EmailTemplate", "parse_address", "validate_json_pointer"]

MAX_RECIPIENTS = 50
_TEMPLATE_MAX_CHARS = 64 * 1024
# RFC 6901: "" or "/" followed by reference tokens, "~" only as "~0" or "~1".
_POINTER_RE = re.compile(r"^(/([^~/]|~[01])*)+$")
# Parsing only (no rendering), to refuse a template that can never render at creation.
_SYNTAX = SandboxedEnvironment()


def parse_address(value: str) -> str:
    """The normalised address, or ValueError saying why ``value`` is not one (syntax only, no DNS)."""
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not an email address: {exc}") from exc


def validate_json_pointer(value: str) -> str:
    if len(value) > 512 or not _POINTER_RE.match(value):
        raise ValueError(f"{value!r} is not a JSON pointer into the event (e.g. /data/customer/email)")
    return value


def _check_syntax(value: str | None) -> str | None:
    if value is not None:
        try:
            _SYNTAX.parse(value)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"template syntax error on line {exc.lineno}: {exc.message}") from exc
    return value


class EmailTemplate(BaseModel):
    """Jinja2 templates rendered against the event: ``{{ data.order.id }}``, ``{{ type }}``, ``{{ id }}``."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=998)
    text: str = Field(min_length=1, max_length=_TEMPLATE_MAX_CHARS)
    # Autoescaped: event data cannot inject markup.
    html: str | None = Field(default=None, min_length=1, max_length=_TEMPLATE_MAX_CHARS)

    _syntax = field_validator("subject", "text", "html")(_check_syntax)


class EmailOptions(BaseModel):
    """An email subscription's channel fields, as stored in its ``options``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # A list of addresses, or a JSON pointer to an address or a list of them in the event.
    to: list[str] | str = Field(description="Addresses, or a JSON pointer into the event such as /data/user/email.")
    from_: str = Field(alias="from", max_length=320)
    reply_to: str | None = Field(default=None, max_length=320)
    template: EmailTemplate

    @field_validator("to")
    @classmethod
    def _to(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            return validate_json_pointer(value)
        if not 1 <= len(value) <= MAX_RECIPIENTS:
            raise ValueError(f"to lists 1 to {MAX_RECIPIENTS} addresses")
        return [parse_address(address) for address in value]

    @field_validator("from_", "reply_to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else parse_address(value)
