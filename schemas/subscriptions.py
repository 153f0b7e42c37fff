"""Subscriptions: which events go where, over which channel."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Channel",
    "SubscriptionCreate",
    "SubscriptionOut",
    "SubscriptionPage",
    "SubscriptionUpdate",
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


class SubscriptionCreate(_SubscriptionFields):
    """What a client sends to create a subscription."""

    channel: Channel = Channel.WEBHOOK
    event_types: list[str] = Field(min_length=1, max_length=100)
    url: str | None = Field(default=None, max_length=2048)
    secret: str | None = None
    description: str = Field(default="", max_length=1000)
    enabled: bool = True
    # Channel options for email and task subscriptions (their own issues give them a schema).
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _channel_needs(self) -> SubscriptionCreate:
        if self.channel is Channel.WEBHOOK and not self.url:
            raise ValueError("a webhook subscription needs a url")
        if self.channel is not Channel.WEBHOOK:
            raise ValueError(f"the {self.channel.value} channel is not available yet; use webhook")
        return self


class SubscriptionUpdate(_SubscriptionFields):
    """A partial update: only the fields present change."""

    event_types: list[str] | None = Field(default=None, min_length=1, max_length=100)
    url: str | None = Field(default=None, max_length=2048)
    description: str | None = Field(default=None, max_length=1000)
    enabled: bool | None = None

    @model_validator(mode="after")
    def _no_nulls(self) -> SubscriptionUpdate:
        # Absent means "leave as is"; an explicit null would erase a required field.
        nulls = sorted(name for name in self.model_fields_set if getattr(self, name) is None)
        if nulls:
            raise ValueError(f"{', '.join(nulls)} cannot be null; leave a field out to keep it")
        return self


class SubscriptionOut(BaseModel):
    """A subscription as the API shows it; ``secret`` only where the caller may see it."""

    id: str
    channel: Channel
    event_types: list[str]
    url: str | None
    description: str
    enabled: bool
    options: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    secret: str | None = None


class SubscriptionPage(BaseModel):
    """One page of subscriptions (never with secrets); pass ``next_after`` as ``after`` for the next."""

    items: list[SubscriptionOut]
    next_after: str | None
