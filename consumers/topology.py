"""The broker topology as kombu entities: one place declares what every process relies on."""

from __future__ import annotations

from kombu import Connection, Exchange, Queue

from schemas import topology as names

__all__ = ["declare_topology", "events_exchange", "ingest_queue", "task_queue", "tasks_exchange"]

events_exchange = Exchange(names.EVENTS_EXCHANGE, type="topic", durable=True)
dead_exchange = Exchange(names.DEAD_EXCHANGE, type="fanout", durable=True)
tasks_exchange = Exchange(names.TASKS_EXCHANGE, type="topic", durable=True)

ingest_queue = Queue(
    names.INGEST_QUEUE,
    exchange=events_exchange,
    routing_key="#",
    durable=True,
    queue_arguments={
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": names.DEAD_EXCHANGE,
        "x-delivery-limit": names.INGEST_DELIVERY_LIMIT,
    },
)
dead_queue = Queue(names.DEAD_QUEUE, exchange=dead_exchange, routing_key="#", durable=True,
                   queue_arguments={"x-queue-type": "quorum"})


def task_queue(name: str) -> Queue:
    """A Celery task queue: quorum (so delayed retries wait in the broker), bound by its own name."""
    return Queue(name, exchange=tasks_exchange, routing_key=name, durable=True,
                 queue_arguments={"x-queue-type": "quorum"})


def declare_topology(connection: Connection, task_queues: tuple[str, ...] = names.BUILTIN_TASK_QUEUES) -> None:
    """Declare exchanges and queues (idempotent); publishing needs them bound, or it is unroutable."""
    channel = connection.channel()
    try:
        for entity in (events_exchange, dead_exchange, tasks_exchange, ingest_queue, dead_queue,
                       *(task_queue(q) for q in task_queues)):
            entity.bind(channel).declare()  # a bound copy: the module-level entities stay unbound
    finally:
        channel.close()
