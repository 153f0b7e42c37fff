"""Which Celery task and queue carry each channel's deliveries, and the task messages that enqueue them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from celery import Celery

from consumers.publisher import OutgoingMessage
from schemas import topology
from schemas.ids import new_id
from schemas.subscriptions import Channel

__all__ = ["CHANNEL_TASKS", "delivery_task_messages", "task_message", "task_queues"]

# Each task takes a list of delivery ids.
CHANNEL_TASKS: dict[str, tuple[str, str]] = {
    Channel.WEBHOOK.value: ("tasks.deliver_webhooks", topology.WEBHOOKS_QUEUE),
}


def task_queues() -> tuple[str, ...]:
    """The queues the channels' tasks go to, each once."""
    return tuple(dict.fromkeys(queue for _, queue in CHANNEL_TASKS.values()))


def delivery_task_messages(celery: Celery, channel: str, delivery_ids: Sequence[str],
                           batch_size: int) -> list[OutgoingMessage]:
    """One task message per ``batch_size`` deliveries of one channel: a task's overhead is shared."""
    return [_task_message(celery, channel, list(delivery_ids[start:start + batch_size]))
            for start in range(0, len(delivery_ids), batch_size)]


def _task_message(celery: Celery, channel: str, delivery_ids: list[str]) -> OutgoingMessage:
    name, queue = CHANNEL_TASKS[channel]
    # A delivery's outcome lives in the store: a stored Celery result per task would be a second
    # database write (the request's ignore_result overrides the task's own).
    return task_message(celery, name, queue, [delivery_ids], new_id(), ignore_result=True)


def task_message(celery: Celery, name: str, queue: str, args: list[Any], task_id: str, *,
                 ignore_result: bool = False) -> OutgoingMessage:
    """A Celery task message for the confirming publisher, to a queue on hookgate.tasks."""
    # Celery's own message builder (protocol 2), so workers see exactly what apply_async would send.
    message = celery.amqp.as_task_v2(task_id, name, args=tuple(args), ignore_result=ignore_result)
    return OutgoingMessage(
        exchange=topology.TASKS_EXCHANGE,
        routing_key=queue,
        body=orjson.dumps(message.body),
        message_id=task_id,
        headers=message.headers,
        properties={"correlation_id": task_id, "content_encoding": "utf-8"},
    )
