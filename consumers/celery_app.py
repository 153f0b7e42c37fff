"""The Celery application, built the way the Celery guide builds it, from hookgate's settings."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import structlog
from celery import Celery, Task
from celery.signals import task_postrun, task_prerun, worker_init

from consumers.beat import beat_schedule
from consumers.store.database import normalise_url
from consumers.topology import declare_topology, task_queue, tasks_exchange
from schemas import topology
from schemas.settings import Settings

__all__ = ["celery_app", "make_celery"]

_DB_BACKEND = "db+"
TASK_MODULES = ["consumers.tasks.webhooks", "consumers.tasks.email", "consumers.tasks.heavy",
                "consumers.tasks.maintenance"]
_WEBHOOK_TASKS = ("tasks.deliver_webhook", "tasks.deliver_webhooks", "tasks.recheck_webhooks",
                  # The sweep's work is to enqueue deliveries: it runs where webhooks are sent.
                  "tasks.sweep_stuck_deliveries")
# celery.chord_unlock polls a split import's chunks (a chord on the result backend's database): its retries
# are routed by name, and would otherwise land on the default queue.
_HEAVY_TASKS = ("tasks.import_file", "tasks.finish_import", "celery.chord_unlock", "tasks.build_report",
                "tasks.email_report", "tasks.cleanup_old_data", "tasks.generate_weekly_report")


def make_celery(settings: Settings) -> Celery:
    backend = settings.celery_result_backend
    if backend.startswith(_DB_BACKEND):
        # Celery's SQLAlchemy backend on the store's database: the driver we ship, and SQLite's lock wait.
        backend = _DB_BACKEND + normalise_url(backend.removeprefix(_DB_BACKEND))
    # The user's task modules (HOOKGATE_TASK_MODULES) after ours: custom task routes' tasks.
    app = Celery("hookgate", broker=settings.broker_url, backend=backend,
                 include=[*TASK_MODULES, *settings.task_modules])
    if backend.startswith(_DB_BACKEND + "sqlite"):
        app.conf.database_engine_options = {"connect_args": {"timeout": 30}}
    app.conf.update(
        task_queues=[task_queue(q) for q in topology.BUILTIN_TASK_QUEUES],
        task_default_exchange=tasks_exchange.name,
        task_default_exchange_type="topic",
        task_default_queue=topology.WEBHOOKS_QUEUE,
        task_default_queue_type="quorum",
        # By queue only: every queue is bound on hookgate.tasks by its own name, so the queue's routing
        # key is the one to use, also when a caller names another queue.
        task_routes={
            **{name: {"queue": topology.WEBHOOKS_QUEUE} for name in _WEBHOOK_TASKS},
            **{name: {"queue": topology.HEAVY_QUEUE} for name in _HEAVY_TASKS},
            "tasks.send_email": {"queue": topology.EMAIL_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Durable hand-off: a task is acked after it ran, and a killed child's task comes back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_transport_options={"confirm_publish": True, "confirm_timeout": settings.publish_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_heartbeat=30,
        result_extended=True,
        # Results are kept as long as everything else; in the store, tasks.cleanup_old_data removes them.
        result_expires=timedelta(days=settings.retention_days),
        beat_schedule=beat_schedule(settings),
        beat_scheduler="consumers.beat:LockedScheduler",
        task_track_started=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
        timezone="UTC",
    )
    # A queue a worker is asked for that is not declared above (`hookgate worker -Q billing`) is made
    # like the built-in ones: quorum, on the topic exchange hookgate.tasks. Celery's default, a classic
    # queue behind a direct exchange of its own, would hold delayed retries in the worker's memory.
    app.conf.task_create_missing_queue_type = "quorum"
    app.amqp.autoexchange = lambda _name: tasks_exchange
    app.conf.hookgate_settings = settings
    return app


@worker_init.connect
def _declare_builtin_queues(sender: Any, **_: Any) -> None:
    """Every built-in queue exists before the worker binds them all to the delayed-delivery exchanges.

    Celery binds every configured queue, not only the ones this worker consumes; one missing (an
    email worker started before anything declared `webhooks`) would switch delayed delivery off.
    """
    with sender.app.connection_for_write() as connection:
        declare_topology(connection)


@task_prerun.connect
def _bind_task_to_logs(task_id: str, task: Task, **_: Any) -> None:
    """Every log line a task writes carries its id and name, whatever module writes it."""
    structlog.contextvars.bind_contextvars(task_id=task_id, task=task.name)


@task_postrun.connect
def _clear_task_from_logs(**_: Any) -> None:
    """Whatever a task bound (its id, its deliveries) stays with it."""
    structlog.contextvars.clear_contextvars()


celery_app = make_celery(Settings())
