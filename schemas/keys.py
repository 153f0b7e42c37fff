"""API key scopes."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Scope"]


class Scope(StrEnum):
    EVENTS_WRITE = "events:write"
    EVENTS_READ = "events:read"
    SUBSCRIPTIONS = "subscriptions"
    ADMIN = "admin"  # implies every other scope
