"""Deliveries of one event to one subscription, and their attempts."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

__all__ = ["AttemptOut", "DeliveryOut", "DeliveryStatus", "EventDeliveries"]


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


OPEN_STATUSES = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)


class AttemptOut(BaseModel):
    number: int
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    subscription_id: str
    status: DeliveryStatus
    attempts_count: int
    created_at: datetime
    updated_at: datetime
    last_error: str | None
    attempts: list[AttemptOut] = []


class EventDeliveries(BaseModel):
    """A stored event (its structured CloudEvent) with every delivery and attempt."""

    event: dict[str, Any]
    received_at: datetime
    deliveries: list[DeliveryOut]
