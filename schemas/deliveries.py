"""Deliveries of one event to one subscription, and their attempts."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

__all__ = [
    "AttemptOut",
    "DeliveryFilter",
    "DeliveryOut",
    "DeliveryPage",
    "DeliveryStatus",
    "EventDeliveries",
    "RecoverRequest",
    "RecoverResult",
]


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    # Email and task deliveries: taken by one worker (a conditional UPDATE) and being sent now.
    SENDING = "sending"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


OPEN_STATUSES = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING, DeliveryStatus.SENDING)
# What a client may send again on demand.
REPLAYABLE_STATUSES = (DeliveryStatus.DEAD, DeliveryStatus.SUCCEEDED)


class AttemptOut(BaseModel):
    number: int
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    response_headers: dict[str, Any] | None = None
    # The first 4 KiB of the response body.
    response_body: str | None = None


class DeliveryOut(BaseModel):
    id: str
    subscription_id: str
    event_id: str
    event_type: str
    status: DeliveryStatus
    attempts_count: int
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    last_error: str | None
    attempts: list[AttemptOut] | None = None


class DeliveryPage(BaseModel):
    """One page of deliveries, newest first; pass ``next_before`` as ``before`` for the next."""

    items: list[DeliveryOut]
    next_before: str | None


class DeliveryFilter(BaseModel):
    """``GET /v1/deliveries`` query parameters."""

    model_config = ConfigDict(extra="forbid")

    status: DeliveryStatus | None = None
    subscription_id: str | None = Field(default=None, max_length=36)
    event_type: str | None = Field(default=None, max_length=255)
    since: AwareDatetime | None = None
    before: str | None = Field(default=None, min_length=1, max_length=36)
    limit: int = Field(default=50, ge=1, le=200)


class RecoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Dead deliveries of events received at or after this time are sent again.
    since: AwareDatetime


class RecoverResult(BaseModel):
    recovered: int


class EventDeliveries(BaseModel):
    """A stored event (its structured CloudEvent) with every delivery and attempt."""

    event: dict[str, Any]
    received_at: datetime
    deliveries: list[DeliveryOut]
