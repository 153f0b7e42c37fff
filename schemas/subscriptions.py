"""Subscriptions: which events go where, over which channel."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.email import EmailOptions, EmailTemplate
from schemas.retries import validate_retry_schedule
from schemas.tasks import TaskOptions

__all__ = [
    "CHANNEL_FIELDS",
    "Channel",
    "PayloadFormat",
    "SecretRotation",
    "SubscriptionCreate",
    "SubscriptionOut",
    "SubscriptionPage",
    "SubscriptionSecret",
    "SubscriptionUpdate",
    "channel_options",
    "validate_secret",
    "validate_topic_pattern",
]

# A pattern word is a literal word, `*` (exactly one word) or `#` (zero or more words).
_PATTERN_WORD_RE = re.compile(r"^([A-Za-z0-9_\-:/]+|\*|#)$")
_SECRET_RE = re.compile(r"^whsec_[A-Za-z0-9+/=]{24,}$")


class Channel(StrEnum):
    WEBHOOK = "webhook"
    EMAIL = "email"
    TASK = "task"


class PayloadFormat(StrEnum):
    """How a webhook carries its event; both are signed with the Standard Webhooks headers."""

    # {"type", "timestamp", "data"} as application/json.
    STANDARD_WEBHOOKS = "standard-webhooks"
    # The structured CloudEvent as application/cloudevents+json (CloudEvents HTTP binding, structured mode).
    CLOUDEVENTS = "cloudevents"

    @property
    def content_type(self) -> str:
        return "application/cloudevents+json" if self is PayloadFormat.CLOUDEVENTS else "application/json"


def validate_topic_pattern(pattern: str) -> str:
    if not pattern or len(pattern.encode()) > 255:
        raise ValueError("an event type pattern is 1 to 255 bytes")
    for word in pattern.split("."):
        if not _PATTERN_WORD_RE.match(word):
            raise ValueError(f"invalid event type pattern {pattern!r}: words are literals, '*' or '#'")
    return pattern


def validate_secret(secret: str) -> str:
    if not _SECRET_RE.match(secret):
        raise ValueError("a signing secret is 'whsec_' followed by base64 of at least 18 bytes")
    return secret


class _SubscriptionFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("event_types", check_fields=False)
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for pattern in value:
                validate_topic_pattern(pattern)
        return value

    @field_validator("secret", check_fields=False)
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return None if value is None else validate_secret(value)

    @field_validator("retry_schedule", check_fields=False)
    @classmethod
    def _schedule(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else list(validate_retry_schedule(value))


class SubscriptionCreate(_SubscriptionFields):
    """What a client sends to create a subscription."""

    channel: Channel = Channel.WEBHOOK
    event_types: list[str] = Field(min_length=1, max_length=100)
    url: str | None = Field(default=None, max_length=2048)
    secret: str | None = None
    description: str = Field(default="", max_length=1000)
    enabled: bool = True
    # Delivery behaviour (webhooks): null means the global setting.
    retry_schedule: list[float] | None = Field(
        default=None, description="Seconds before each attempt; null: HOOKGATE_RETRY_SCHEDULE."
    )
    payload_format: PayloadFormat = PayloadFormat.STANDARD_WEBHOOKS
    rate_limit_per_s: float | None = Field(default=None, gt=0, description="Requests per second; null: unlimited.")
    max_in_flight: int | None = Field(
        default=None, ge=1, description="Concurrent requests to the endpoint; null: the global default."
    )
    # Email: recipients (addresses, or a JSON pointer into the event), sender and templates.
    to: list[str] | str | None = Field(default=None, description="Email: addresses, or a JSON pointer such as "
                                       "/data/customer/email to an address or a list of them in the event.")
    from_: str | None = Field(default=None, alias="from", max_length=320, description="Email: the sender.")
    reply_to: str | None = Field(default=None, max_length=320, description="Email: the Reply-To address.")
    template: EmailTemplate | None = Field(default=None, description="Email: Jinja2 subject, text and html.")
    # Task: the user's Celery task and its queue.
    task: str | None = Field(default=None, max_length=200, description="Task: the Celery task's registered name.")
    queue: str | None = Field(default=None, max_length=100, description="Task: the queue it is consumed from.")
    # Set from the channel fields above, as the store keeps them; not given by clients.
    options: dict[str, Any] = Field(default_factory=dict, exclude=True, json_schema_extra={"readOnly": True})

    @model_validator(mode="after")
    def _channel_needs(self) -> SubscriptionCreate:
        given = {name for name in CHANNEL_FIELDS if getattr(self, name) is not None}
        allowed = _CHANNEL_FIELDS_OF[self.channel]
        if given - allowed:
            fields = ", ".join(sorted(_ALIASES.get(name, name) for name in given - allowed))
            raise ValueError(f"{fields} do not apply to a {self.channel.value} subscription")
        if self.options:
            raise ValueError("options are set from the channel's fields; give those instead")
        if self.channel is Channel.WEBHOOK:
            if not self.url:
                raise ValueError("a webhook subscription needs a url")
            return self
        if self.url is not None:
            raise ValueError(f"a {self.channel.value} subscription has no url")
        model = _OPTIONS_OF[self.channel]
        missing = sorted(_ALIASES.get(name, name) for name in model.model_fields
                         if model.model_fields[name].is_required() and getattr(self, name) is None)
        if missing:
            raise ValueError(f"a {self.channel.value} subscription needs {', '.join(missing)}")
        self.options = channel_options(self.channel, {name: getattr(self, name) for name in model.model_fields})
        return self


class _NoChannelFields(BaseModel):
    """A webhook subscription has no channel fields: any given is refused by name."""

    model_config = ConfigDict(extra="forbid")


_OPTIONS_OF: dict[Channel, type[BaseModel]] = {
    Channel.WEBHOOK: _NoChannelFields, Channel.EMAIL: EmailOptions, Channel.TASK: TaskOptions,
}


def channel_options(channel: Channel, values: dict[str, Any]) -> dict[str, Any]:
    """A channel's fields (by name or alias) as the store keeps them in ``options``; ValidationError if bad."""
    return _OPTIONS_OF[channel].model_validate(values).model_dump(mode="json", by_alias=True, exclude_none=True)


_CHANNEL_FIELDS_OF = {
    Channel.WEBHOOK: frozenset[str](),
    Channel.EMAIL: frozenset({"to", "from_", "reply_to", "template"}),
    Channel.TASK: frozenset({"task", "queue"}),
}
# The field names (not aliases) of every channel's fields.
CHANNEL_FIELDS = frozenset().union(*_CHANNEL_FIELDS_OF.values())
_ALIASES = {"from_": "from"}


class SubscriptionUpdate(_SubscriptionFields):
    """A partial update: only the fields present change."""

    event_types: list[str] | None = Field(default=None, min_length=1, max_length=100)
    url: str | None = Field(default=None, max_length=2048)
    description: str | None = Field(default=None, max_length=1000)
    enabled: bool | None = None
    # null is a value here: back to the global setting.
    retry_schedule: list[float] | None = None
    payload_format: PayloadFormat | None = None
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    max_in_flight: int | None = Field(default=None, ge=1)
    # Channel fields of email and task subscriptions; checked against the subscription's channel when applied.
    to: list[str] | str | None = None
    from_: str | None = Field(default=None, alias="from", max_length=320)
    reply_to: str | None = Field(default=None, max_length=320, description="null removes it.")
    template: EmailTemplate | None = Field(default=None, description="Replaces the whole template.")
    task: str | None = Field(default=None, max_length=200)
    queue: str | None = Field(default=None, max_length=100)

    def channel_changes(self) -> dict[str, Any]:
        """The channel fields present, by the names ``options`` uses (``from``, not ``from_``)."""
        return {_ALIASES.get(name, name): getattr(self, name) for name in self.model_fields_set & CHANNEL_FIELDS}

    @model_validator(mode="after")
    def _no_nulls(self) -> SubscriptionUpdate:
        # Absent means "leave as is"; an explicit null would erase a required field.
        nulls = sorted(name for name in self.model_fields_set - _NULLABLE if getattr(self, name) is None)
        if nulls:
            raise ValueError(f"{', '.join(nulls)} cannot be null; leave a field out to keep it")
        return self


# Fields whose null means "the global default" rather than "erase".
_NULLABLE = frozenset({"retry_schedule", "rate_limit_per_s", "max_in_flight", "reply_to"})


class SubscriptionOut(BaseModel):
    """A subscription as the API shows it; ``secret`` only where the caller may see it."""

    id: str
    channel: Channel
    event_types: list[str]
    url: str | None
    description: str
    enabled: bool
    # Why hookgate disabled the subscription (e.g. the endpoint answered 410); cleared on re-enabling.
    disabled_reason: str | None = None
    retry_schedule: list[float] | None = None
    payload_format: PayloadFormat = PayloadFormat.STANDARD_WEBHOOKS
    rate_limit_per_s: float | None = None
    max_in_flight: int | None = None
    options: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    secret: str | None = None


class SubscriptionPage(BaseModel):
    """One page of subscriptions (never with secrets); pass ``next_after`` as ``after`` for the next."""

    items: list[SubscriptionOut]
    next_after: str | None


class SecretRotation(BaseModel):
    """``POST /v1/subscriptions/{id}/rotate-secret``: the new secret, or none to have one generated."""

    model_config = ConfigDict(extra="forbid")

    secret: str | None = None

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return None if value is None else validate_secret(value)


class SubscriptionSecret(BaseModel):
    """A subscription's current signing secret, and until when the one before it still signs."""

    secret: str
    previous_secret_expires_at: datetime | None = None
