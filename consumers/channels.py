"""Which Celery task and queue carry each delivery, and the task messages that enqueue them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import amqp
import orjson
from celery import Celery, Signature
from kombu import Connection
from kombu.exceptions import KombuError

from consumers.publisher import ConfirmingPublisher, OutgoingMessage, PublishError
from consumers.store.ingest import ActiveSubscription, PendingDelivery
from consumers.topology import declare_topology
from schemas import topology
from schemas.ids import new_id
from schemas.subscriptions import Channel

__all__ = ["EMAIL_ROUTE", "WEBHOOK_ROUTE", "TaskQueues", "TaskRoute", "delivery_task_messages", "route_of",
           "task_calls", "task_message", "task_queues"]


@dataclass(frozen=True, slots=True)
class TaskRoute:
    """A task and its queue; the queue is also the routing key on ``hookgate.tasks``."""

    task: str
    queue: str
    # Webhook tasks take a list of delivery ids (one claim for many); email tasks one delivery id;
    # custom tasks (event id, delivery id).
    batched: bool = False
    with_event_id: bool = False


WEBHOOK_ROUTE = TaskRoute("tasks.deliver_webhooks", topology.WEBHOOKS_QUEUE, batched=True)
EMAIL_ROUTE = TaskRoute("tasks.send_email", topology.EMAIL_QUEUE)


def route_of(subscription: ActiveSubscription) -> TaskRoute:
    """Where this subscription's deliveries go: a built-in channel's task, or the task it names."""
    if subscription.channel == Channel.WEBHOOK.value:
        return WEBHOOK_ROUTE
    if subscription.channel == Channel.EMAIL.value:
        return EMAIL_ROUTE
    options = subscription.options
    return TaskRoute(str(options["task"]), str(options["queue"]), with_event_id=True)


def task_queues() -> tuple[str, ...]:
    """The built-in channels' queues, each once."""
    return topology.BUILTIN_TASK_QUEUES


def task_calls(pending: Sequence[PendingDelivery], batch_size: int) -> list[tuple[TaskRoute, tuple[object, ...]]]:
    """The task calls that send these deliveries, grouped by (task, queue); batched tasks take ``batch_size`` each."""
    by_route: dict[TaskRoute, list[PendingDelivery]] = {}
    for delivery in pending:
        by_route.setdefault(route_of(delivery.subscription), []).append(delivery)
    calls: list[tuple[TaskRoute, tuple[object, ...]]] = []
    for route, group in by_route.items():
        if route.batched:
            ids = [d.delivery_id for d in group]
            calls.extend((route, (ids[start:start + batch_size],)) for start in range(0, len(ids), batch_size))
        else:
            calls.extend((route, (d.event_id, d.delivery_id) if route.with_event_id else (d.delivery_id,))
                         for d in group)
    return calls


def delivery_task_messages(celery: Celery, pending: Sequence[PendingDelivery],
                           batch_size: int) -> list[OutgoingMessage]:
    """The task messages of ``task_calls``, for a ``ConfirmingPublisher``."""
    return [_task_message(celery, route, args) for route, args in task_calls(pending, batch_size)]


def _task_message(celery: Celery, route: TaskRoute, args: tuple[object, ...]) -> OutgoingMessage:
    # A delivery's outcome lives in the store: a stored Celery result per task would be a second
    # database write (the request's ignore_result overrides the task's own). Custom tasks keep theirs,
    # so their callers can check a task's state as the Celery guide does.
    return task_message(celery, route.task, route.queue, args, new_id(), ignore_result=not route.with_event_id)


def task_message(celery: Celery, name: str, queue: str, args: Sequence[object], task_id: str, *,
                 ignore_result: bool = False, then: Sequence[Signature] = ()) -> OutgoingMessage:
    """A Celery task message for the confirming publisher, to a queue on hookgate.tasks.

    ``then``: the tasks that follow it, in order, as ``chain(this, *then)`` would run them.
    """
    # Celery's own message builder (protocol 2), so workers see exactly what apply_async would send;
    # a chain travels in the message as the rest of its tasks, last first.
    message = celery.amqp.as_task_v2(task_id, name, args=tuple(args), ignore_result=ignore_result,
                                     chain=[dict(signature) for signature in reversed(then)] or None)
    return OutgoingMessage(
        exchange=topology.TASKS_EXCHANGE,
        routing_key=queue,
        body=orjson.dumps(message.body),
        message_id=task_id,
        headers=message.headers,
        properties={"correlation_id": task_id, "content_encoding": "utf-8"},
    )


class TaskQueues:
    """Custom task routes' queues, declared (durable, quorum, bound on hookgate.tasks) before the first publish.

    A publish to a queue that does not exist is unroutable and fails; so each process declares a new
    queue name once, and again after a failed publish (the broker may have lost it).
    """

    def __init__(self, broker_url: str) -> None:
        self._broker_url = broker_url
        self._declared = set(topology.BUILTIN_TASK_QUEUES)

    async def publish(self, publisher: ConfirmingPublisher, messages: Sequence[OutgoingMessage]) -> None:
        """Declare the queues these task messages go to that this process has not declared, then publish."""
        try:
            await self._ensure(messages)
            await publisher.publish(messages)
        except PublishError:
            self._declared = set(topology.BUILTIN_TASK_QUEUES)
            raise

    async def _ensure(self, messages: Iterable[OutgoingMessage]) -> None:
        missing = {m.routing_key for m in messages if m.exchange == topology.TASKS_EXCHANGE} - self._declared
        if missing:
            await asyncio.to_thread(self._declare, tuple(sorted(missing)))
            self._declared |= missing

    def _declare(self, names: tuple[str, ...]) -> None:
        try:
            with Connection(self._broker_url, connect_timeout=5) as connection:
                declare_topology(connection, names)
        except (OSError, amqp.exceptions.AMQPError, KombuError) as exc:
            raise PublishError(f"could not declare the task queues {', '.join(names)}: {exc}") from exc
