"""Heavy jobs (file imports and delivery reports): what a client asks for and what it reads back."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.deliveries import DeliveryStatus
from schemas.reports import validate_recipients

__all__ = [
    "REPORT_COLUMNS",
    "FileFormat",
    "ImportFromUrl",
    "JobKind",
    "JobOut",
    "JobProgress",
    "JobStatus",
    "QueueOut",
    "QueuesOut",
    "ReportRequest",
    "TaskOut",
    "import_event_id",
]


class JobKind(StrEnum):
    IMPORT = "import"
    REPORT = "report"


class FileFormat(StrEnum):
    NDJSON = "ndjson"
    CSV = "csv"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


FINISHED_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED)

# The columns of a delivery report, in order.
REPORT_COLUMNS = ("delivery_id", "event_id", "event_type", "subscription_id", "status", "attempts_count",
                  "created_at", "updated_at", "last_error")


def import_event_id(job_id: str, line: int) -> str:
    """The id of the event an import publishes for a line: the same on every run of the job."""
    return f"{job_id}:{line}"


class ImportFromUrl(BaseModel):
    """``POST /v1/files`` with JSON: the heavy task downloads the file (through the SSRF guard)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal[JobKind.IMPORT]
    format: FileFormat
    url: str = Field(min_length=1, max_length=2048)


class ReportRequest(BaseModel):
    """``POST /v1/files`` with JSON ``kind: report``: a CSV of the deliveries created in ``[since, until)``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal[JobKind.REPORT]
    since: AwareDatetime
    until: AwareDatetime
    status: DeliveryStatus | None = None
    subscription_id: str | None = Field(default=None, max_length=36)
    event_type: str | None = Field(default=None, max_length=255)
    # Addresses the finished CSV is emailed to, as an attachment.
    email_to: tuple[str, ...] = Field(default=(), max_length=50)

    _recipients = field_validator("email_to")(validate_recipients)

    @model_validator(mode="after")
    def _ordered(self) -> ReportRequest:
        if self.until <= self.since:
            raise ValueError("until must be after since")
        return self


class JobProgress(BaseModel):
    """How far a job got; ``*_total`` is null until known (a download not yet done, a report)."""

    bytes_done: int
    bytes_total: int | None
    lines_done: int
    percent: float | None


class JobOut(BaseModel):
    id: str
    kind: JobKind
    format: FileFormat
    status: JobStatus
    # The first task's id; a job that continued past a soft time limit runs on in ``current_task_id``.
    task_id: str
    current_task_id: str
    progress: JobProgress
    # Lines published as events, lines refused (in the error report), report rows written.
    counts: dict[str, int]
    error: str | None
    # Download paths of the error report and the report's CSV, once they exist.
    links: dict[str, str]
    continuations: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class TaskOut(BaseModel):
    """A Celery task's state as the result backend holds it; an id it does not know reads PENDING."""

    task_id: str
    state: str
    name: str | None = None
    queue: str | None = None
    # SUCCESS: the return value; PROGRESS: its meta; FAILURE and RETRY: null (see ``error``).
    result: Any = None
    error: str | None = None
    date_done: datetime | None = None


class QueueOut(BaseModel):
    name: str
    messages_ready: int
    # Null when the broker's management API is not configured (HOOKGATE_BROKER_MANAGEMENT_URL).
    messages_unacknowledged: int | None
    consumers: int


class QueuesOut(BaseModel):
    items: list[QueueOut]
