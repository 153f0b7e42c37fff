"""The gateway's Starlette application: routes, problem handlers, and what lives as long as the process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware

from consumers.celery_app import make_celery
from consumers.channels import TaskQueues
from consumers.publisher import ConfirmingPublisher
from consumers.runtime import tune_gc
from consumers.store.database import make_engine, make_sessionmaker
from consumers.topology import declare_topology
from gateway import ingest, openapi
from gateway.auth import KeyCache
from gateway.middleware import RequestId
from gateway.problems import BodyLimit, exception_handlers
from gateway.routes import deliveries, events, files, health, jobs, metrics, queues, subscriptions, tasks
from schemas.settings import Settings

__all__ = ["create_app"]

log = structlog.get_logger(__name__)


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = make_engine(settings.database_url)
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.read_sessions = make_sessionmaker(engine, readonly=True)
    app.state.keys = KeyCache(app.state.read_sessions, ttl_s=settings.api_key_cache_ttl_s)
    publisher = ConfirmingPublisher(
        settings.broker_url,
        confirm_timeout_s=settings.publish_timeout_s,
        max_batch=settings.publish_max_batch,
        # Declaring the exchange and ingest queue on connect means events are durable even before a router runs.
        declare=declare_topology,
    )
    app.state.publisher = publisher
    await publisher.start()
    tune_gc()
    log.info("gateway_started")
    try:
        yield
    finally:
        await publisher.close()
        engine.dispose()
        log.info("gateway_stopped")


def create_app(settings: Settings | None = None) -> Starlette:
    """The gateway; ``settings`` default to the ``HOOKGATE_*`` environment. Migrations are not run here."""
    settings = settings or Settings()
    app = Starlette(
        routes=[*ingest.routes, *events.routes, *subscriptions.routes, *deliveries.routes, *files.routes,
                *jobs.routes, *tasks.routes, *queues.routes, *health.routes, *metrics.routes, *openapi.routes],
        # Starlette's own max_body_size answers a too-long Content-Length in plain text; BodyLimit with a problem.
        # RequestId first, outermost: BodyLimit's 413s carry the id too.
        # Uploads have the file size limit and no body deadline: they are authenticated before they are read.
        middleware=[Middleware(RequestId), Middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                                                       timeout_s=settings.http_body_timeout_s,
                                                       paths={files.FILES_PATH: (settings.max_file_bytes, None)})],
        exception_handlers=exception_handlers(),
        lifespan=_lifespan,
    )
    app.state.settings = settings
    # Builds the task messages of manual retries; it never connects.
    app.state.celery = make_celery(settings)
    # Declares a custom task route's queue before a retry is first published to it.
    app.state.task_queues = TaskQueues(settings.broker_url)
    return app
