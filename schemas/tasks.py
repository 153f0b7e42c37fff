"""Custom task routes: the user's Celery task, and the queue its deliveries wait on."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.topology import BUILTIN_TASK_QUEUES, HEAVY_QUEUE, RESERVED_QUEUE_PREFIXES

__all__ = ["TaskOptions"]

# A dotted Python path: the name a task is registered under (module.function by Celery's default).
_TASK_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
# The queue is also its routing key on the topic exchange: no wildcards, no empty words.
_QUEUE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*$")
# hookgate's own tasks take other arguments; a subscription must not be able to call them.
_RESERVED_TASK_PREFIXES = ("tasks.", "celery.", "consumers.", "gateway.")


class TaskOptions(BaseModel):
    """A task subscription's channel fields, as stored in its ``options``."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(max_length=200,
                      description="The Celery task's registered name, e.g. billing.tasks.handle_invoice.")
    queue: str = Field(max_length=100, description="Its queue (and routing key on hookgate.tasks), e.g. billing.")

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if not _TASK_RE.match(value):
            raise ValueError("a task name is a dotted Python path such as billing.tasks.handle_invoice")
        if value.startswith(_RESERVED_TASK_PREFIXES):
            raise ValueError(f"task names starting with {', '.join(_RESERVED_TASK_PREFIXES)} are hookgate's own")
        return value

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str) -> str:
        if not _QUEUE_RE.match(value):
            raise ValueError("a queue name is lower-case words of letters, digits, '-' and '_' joined by dots")
        if value in (*BUILTIN_TASK_QUEUES, HEAVY_QUEUE) or value.startswith(RESERVED_QUEUE_PREFIXES):
            raise ValueError(f"the queue {value!r} is reserved for hookgate")
        return value
