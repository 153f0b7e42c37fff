"""Custom task routes: ``@delivery_task`` makes a user's function a Celery task that hookgate routes events to.

Usage (a module named in ``HOOKGATE_TASK_MODULES``)::

    from consumers.tasks.custom import PermanentError, delivery_task, load_event

    @delivery_task(name="billing.tasks.handle_invoice", soft_time_limit=20, time_limit=30)
    def handle_invoice(event_id: str, delivery_id: str) -> dict:
        event = load_event(delivery_id)
        ...
        return {"invoice": event["data"]["invoice_id"]}

The task receives ids, not the event. Around the function hookgate claims the delivery (one
worker at a time, `sending` under a lease), records the attempt (the return value as its
response, an exception's text as its error), and retries a failure on the retry policy;
``PermanentError`` ends the delivery dead at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from celery import Task

from consumers.celery_app import celery_app
from consumers.store.deliveries import ChannelJob
from consumers.store.queries import delivery_event
from consumers.tasks.runner import Attempted, PermanentError, process_sessions, run_delivery
from schemas.settings import Settings
from schemas.subscriptions import Channel

__all__ = ["PermanentError", "delivery_task", "load_event"]


def load_event(delivery_id: str) -> dict[str, Any]:
    """The structured CloudEvent (``id``, ``source``, ``type``, ``time``, ``data``, ...) a delivery carries."""
    event = delivery_event(process_sessions(celery_app), delivery_id)
    if event is None:
        raise PermanentError(f"there is no delivery {delivery_id!r}")
    return event


def delivery_task(name: str, **options: Any) -> Callable[[Callable[[str, str], Any]], Task]:
    """Register ``fn(event_id, delivery_id)`` as the Celery task ``name`` (options as for ``celery_app.task``).

    Acked late with the other tasks; the time limits default to ``HOOKGATE_TASK_SOFT_TIME_LIMIT_S``
    and ``HOOKGATE_TASK_TIME_LIMIT_S``. The Celery result is the attempt's outcome, so
    ``AsyncResult(task_id).result`` tells how the attempt went.
    """

    def register(fn: Callable[[str, str], Any]) -> Task:
        def run(self: Task, event_id: str, delivery_id: str) -> dict[str, Any]:
            settings: Settings = self.app.conf.hookgate_settings

            def act(job: ChannelJob) -> Attempted:
                if job.options.get("task") != self.name:
                    raise PermanentError(f"the subscription routes to {job.options.get('task')!r}, not {self.name!r}")
                result = fn(event_id, delivery_id)
                return Attempted(detail=None if result is None else orjson.dumps(result, default=str).decode())

            # Every task queue is bound by its own name: the routing key this came with is its queue.
            queue = (self.request.delivery_info or {}).get("routing_key") or ""
            return run_delivery(self, Channel.TASK, delivery_id, act, queue=queue,
                                time_limit_s=self.time_limit or settings.task_time_limit_s)

        run.__doc__ = fn.__doc__
        run.__name__ = fn.__name__
        run.__qualname__ = fn.__qualname__
        run.__module__ = fn.__module__
        return celery_app.task(name=name, bind=True, acks_late=True, max_retries=None, **options)(run)

    return register
