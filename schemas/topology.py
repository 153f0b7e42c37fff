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
BUILTIN_TASK_QUEUES = (WEBHOOKS_QUEUE, HEAVY_QUEUE)

# Messages that keep crashing the router are dead-lettered by the broker after this many deliveries.
INGEST_DELIVERY_LIMIT = 20

ERROR_HEADER = "x-hookgate-error"
