"""``/v1/deliveries``: find deliveries and their attempts, and send finished ones again."""

from __future__ import annotations

import asyncio

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.channels import TaskQueues, delivery_task_messages
from consumers.publisher import PublishError
from consumers.store import replay
from consumers.store.ingest import pending_deliveries
from consumers.store.queries import get_delivery, list_deliveries
from consumers.store.subscriptions import get_subscription
from gateway.auth import authenticate
from gateway.problems import Problem
from gateway.routes._json import model_response, read_model, validated
from schemas.deliveries import DeliveryFilter, DeliveryPage, RecoverRequest, RecoverResult
from schemas.keys import Scope
from schemas.settings import Settings

__all__ = ["enqueue_deliveries", "routes"]

log = structlog.get_logger(__name__)


async def enqueue_deliveries(request: Request, delivery_ids: list[str]) -> None:
    """Publish the tasks for deliveries already made pending in the store, on their routes; 503 if not confirmed."""
    settings: Settings = request.app.state.settings
    pending = await asyncio.to_thread(pending_deliveries, request.app.state.read_sessions, delivery_ids)
    messages = delivery_task_messages(request.app.state.celery, pending, settings.webhook_batch_size)
    queues: TaskQueues = request.app.state.task_queues
    try:
        await queues.publish(request.app.state.publisher, messages)
    except PublishError as exc:
        # The deliveries are pending in the store already; the stuck-delivery sweep sends them later.
        raise Problem(503, f"the broker did not take the retry: {exc}; it will be sent later",
                      headers={"Retry-After": str(settings.broker_retry_after_s)}) from exc


async def delivery_collection(request: Request) -> Response:
    await authenticate(request, Scope.EVENTS_READ)
    where = validated(DeliveryFilter, dict(request.query_params))
    items, next_before = await asyncio.to_thread(list_deliveries, request.app.state.read_sessions, where)
    page = DeliveryPage(items=items, next_before=next_before)
    return model_response(page, exclude={"items": {"__all__": {"attempts"}}})


async def delivery_item(request: Request) -> Response:
    await authenticate(request, Scope.EVENTS_READ)
    return await _delivery_response(request, request.path_params["delivery_id"])


async def _delivery_response(request: Request, delivery_id: str, status: int = 200) -> Response:
    found = await asyncio.to_thread(get_delivery, request.app.state.read_sessions, delivery_id)
    if found is None:
        raise Problem(404, f"there is no delivery {delivery_id!r}")
    return model_response(found, status)


async def delivery_retry(request: Request) -> Response:
    """``POST /v1/deliveries/{id}/retry``: send a dead or succeeded delivery again, on a fresh schedule."""
    principal = await authenticate(request, Scope.SUBSCRIPTIONS)
    delivery_id = request.path_params["delivery_id"]
    outcome = await asyncio.to_thread(replay.retry_delivery, request.app.state.sessions, delivery_id)
    if outcome is replay.RetryRefusal.NOT_FOUND:
        raise Problem(404, f"there is no delivery {delivery_id!r}")
    if isinstance(outcome, replay.RetryRefusal):
        raise Problem(409, f"delivery {delivery_id!r} cannot be retried: {outcome}")
    await enqueue_deliveries(request, [delivery_id])
    log.info("delivery_retry_requested", delivery_id=delivery_id, key_id=principal.key_id)
    return await _delivery_response(request, delivery_id, 202)


async def subscription_recover(request: Request) -> Response:
    """``POST /v1/subscriptions/{id}/recover``: send the subscription's dead deliveries since a time again."""
    principal = await authenticate(request, Scope.SUBSCRIPTIONS)
    subscription_id = request.path_params["subscription_id"]
    body = await read_model(request, RecoverRequest)
    subscription = await asyncio.to_thread(get_subscription, request.app.state.read_sessions, subscription_id)
    if subscription is None:
        raise Problem(404, f"there is no subscription {subscription_id!r}")
    if not subscription.enabled:
        raise Problem(409, f"subscription {subscription_id!r} is disabled; enable it first")
    chunks = replay.recover_dead(request.app.state.sessions, subscription_id, body.since)
    recovered = 0
    while (ids := await asyncio.to_thread(next, chunks, None)) is not None:
        await enqueue_deliveries(request, ids)
        recovered += len(ids)
    log.info("subscription_recovered", subscription_id=subscription_id, key_id=principal.key_id, recovered=recovered)
    return model_response(RecoverResult(recovered=recovered), 202)


routes = [
    Route("/v1/deliveries", delivery_collection, methods=["GET"], name="deliveries"),
    Route("/v1/deliveries/{delivery_id}", delivery_item, methods=["GET"], name="delivery"),
    Route("/v1/deliveries/{delivery_id}/retry", delivery_retry, methods=["POST"], name="delivery_retry"),
    Route("/v1/subscriptions/{subscription_id}/recover", subscription_recover, methods=["POST"],
          name="subscription_recover"),
]
