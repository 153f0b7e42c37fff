"""Names of every exchange and queue hookgate relies on, as data."""

from __future__ import annotations

EVENTS_EXCHANGE = "hookgate.events"
INGEST_QUEUE = "hookgate.ingest"
DEAD_EXCHANGE = "hookgate.dead"
DEAD_QUEUE = "hookgate.dead"
TASKS_EXCHANGE = "hookgate.tasks"

WEBHOOKS_QUEUE = "webhooks"
EMAIL_QUEUE = "email"
HEAVY_QUEUE = "heavy"
BUILTIN_TASK_QUEUES = (WEBHOOKS_QUEUE, EMAIL_QUEUE, HEAVY_QUEUE)
# Queue names a custom task route may not take: the built-in ones, and the prefixes of RabbitMQ,
# Celery and hookgate.
RESERVED_QUEUE_PREFIXES = ("amq.", "celery", "hookgate.")

# Messages that keep crashing the router are dead-lettered by the broker after this many deliveries.
INGEST_DELIVERY_LIMIT = 20

ERROR_HEADER = "x-hookgate-error"
# When the gateway accepted an event (ISO 8601, UTC): the router stores it as the event's received_at.
ACCEPTED_AT_HEADER = "x-hookgate-accepted-at"

# Held by the one beat that schedules: an exclusive queue, owned by that process's connection.
BEAT_LOCK_QUEUE = "hookgate.beat"
