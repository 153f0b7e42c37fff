"""``/v1/subscriptions``: create, page through, read, change and delete subscriptions."""

from __future__ import annotations

import asyncio

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.ssrf import TargetPolicy, UnsafeTargetError, check_target
from consumers.store import deliveries
from consumers.store import subscriptions as store
from gateway.auth import authenticate
from gateway.problems import Problem
from gateway.routes._json import field_errors, model_response, read_model, validated
from gateway.routes.deliveries import enqueue_deliveries
from schemas.keys import Scope
from schemas.settings import Settings
from schemas.subscriptions import (
    SecretRotation,
    SubscriptionCreate,
    SubscriptionOut,
    SubscriptionPage,
    SubscriptionUpdate,
)

__all__ = ["PAGE_LIMIT_DEFAULT", "PAGE_LIMIT_MAX", "routes"]

log = structlog.get_logger(__name__)

PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 200
_RELEASE_CHUNK = 1000


class _PageQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    limit: int = Field(default=PAGE_LIMIT_DEFAULT, ge=1, le=PAGE_LIMIT_MAX)
    after: str | None = Field(default=None, min_length=1, max_length=36)


async def _check_url(request: Request, url: str) -> None:
    settings: Settings = request.app.state.settings
    try:
        # Resolving the host is blocking DNS: keep it off the event loop.
        await asyncio.to_thread(check_target, url, TargetPolicy.from_settings(settings))
    except UnsafeTargetError as exc:
        raise Problem(
            422, f"the webhook url is refused: {exc}", errors=[{"field": "url", "message": str(exc)}]
        ) from exc


async def _release_held(request: Request, subscription: SubscriptionOut) -> None:
    """Send the deliveries that waited while the subscription was disabled or its endpoint paused."""
    sessions = request.app.state.sessions
    while released := await asyncio.to_thread(deliveries.release_held, sessions, subscription.id, _RELEASE_CHUNK):
        await enqueue_deliveries(request, released)


def _unfit_channel_fields(exc: ValidationError) -> Problem:
    errors = field_errors(exc)
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return Problem(422, f"the channel fields do not fit this subscription: {detail}", errors=errors)


def _not_found(subscription_id: str) -> Problem:
    return Problem(404, f"there is no subscription {subscription_id!r}")


def _no_secret(subscription_id: str) -> Problem:
    return Problem(409, f"subscription {subscription_id!r} signs nothing: only webhook subscriptions have a secret")


class SubscriptionCollection(HTTPEndpoint):
    """``/v1/subscriptions``."""

    async def get(self, request: Request) -> Response:
        await authenticate(request, Scope.SUBSCRIPTIONS)
        query = validated(_PageQuery, dict(request.query_params))
        items, next_after = await asyncio.to_thread(
            store.list_subscriptions, request.app.state.read_sessions, limit=query.limit, after=query.after
        )
        page = SubscriptionPage(items=items, next_after=next_after)
        return model_response(page, exclude={"items": {"__all__": {"secret"}}})

    async def post(self, request: Request) -> Response:
        principal = await authenticate(request, Scope.SUBSCRIPTIONS)
        data = await read_model(request, SubscriptionCreate)
        if data.url is not None:
            await _check_url(request, data.url)
        created: SubscriptionOut = await asyncio.to_thread(
            store.create_subscription, request.app.state.sessions, data, owner_key_id=principal.key_id
        )
        log.info("subscription_created", subscription_id=created.id, key_id=principal.key_id)
        response = model_response(created, 201)
        response.headers["Location"] = str(request.url_for("subscription", subscription_id=created.id).path)
        return response


class SubscriptionItem(HTTPEndpoint):
    """``/v1/subscriptions/{subscription_id}``."""

    async def get(self, request: Request) -> Response:
        await authenticate(request, Scope.SUBSCRIPTIONS)
        subscription_id = request.path_params["subscription_id"]
        found = await asyncio.to_thread(store.get_subscription, request.app.state.read_sessions, subscription_id)
        if found is None:
            raise _not_found(subscription_id)
        return model_response(found, exclude={"secret"})

    async def patch(self, request: Request) -> Response:
        principal = await authenticate(request, Scope.SUBSCRIPTIONS)
        subscription_id = request.path_params["subscription_id"]
        changes = await read_model(request, SubscriptionUpdate)
        if changes.url is not None:
            await _check_url(request, changes.url)
        try:
            updated = await asyncio.to_thread(
                store.update_subscription, request.app.state.sessions, subscription_id, changes
            )
        except ValidationError as exc:
            raise _unfit_channel_fields(exc) from exc
        if updated is None:
            raise _not_found(subscription_id)
        if changes.enabled:
            await _release_held(request, updated)
        log.info(
            "subscription_updated",
            subscription_id=subscription_id,
            key_id=principal.key_id,
            fields=sorted(changes.model_fields_set),
        )
        return model_response(updated, exclude={"secret"})

    async def delete(self, request: Request) -> Response:
        principal = await authenticate(request, Scope.SUBSCRIPTIONS)
        subscription_id = request.path_params["subscription_id"]
        cancelled = await asyncio.to_thread(store.delete_subscription, request.app.state.sessions, subscription_id)
        if cancelled is None:
            raise _not_found(subscription_id)
        log.info(
            "subscription_deleted",
            subscription_id=subscription_id,
            key_id=principal.key_id,
            cancelled_deliveries=cancelled,
        )
        return Response(status_code=204)


async def subscription_secret(request: Request) -> Response:
    """``GET /v1/subscriptions/{subscription_id}/secret``: the signing secret, on its own."""
    await authenticate(request, Scope.SUBSCRIPTIONS)
    subscription_id = request.path_params["subscription_id"]
    try:
        found = await asyncio.to_thread(store.get_secret, request.app.state.read_sessions, subscription_id)
    except store.NoSecretError as exc:
        raise _no_secret(subscription_id) from exc
    if found is None:
        raise _not_found(subscription_id)
    return model_response(found)


async def rotate_subscription_secret(request: Request) -> Response:
    """``POST /v1/subscriptions/{subscription_id}/rotate-secret``: a new secret, answered once.

    The body is optional: ``{"secret": "whsec_..."}`` sets that one, no body generates one.
    """
    principal = await authenticate(request, Scope.SUBSCRIPTIONS)
    subscription_id = request.path_params["subscription_id"]
    rotation = await read_model(request, SecretRotation) if await request.body() else SecretRotation()
    settings: Settings = request.app.state.settings
    try:
        rotated = await asyncio.to_thread(
            store.rotate_secret, request.app.state.sessions, subscription_id, rotation.secret,
            grace_s=settings.secret_rotation_grace_s,
        )
    except store.NoSecretError as exc:
        raise _no_secret(subscription_id) from exc
    if rotated is None:
        raise _not_found(subscription_id)
    log.info("subscription_secret_rotated", subscription_id=subscription_id, key_id=principal.key_id,
             previous_secret_expires_at=rotated.previous_secret_expires_at)
    return model_response(rotated)


routes = [
    Route("/v1/subscriptions", SubscriptionCollection, name="subscriptions"),
    Route("/v1/subscriptions/{subscription_id}", SubscriptionItem, name="subscription"),
    Route("/v1/subscriptions/{subscription_id}/secret", subscription_secret, name="subscription_secret"),
    Route("/v1/subscriptions/{subscription_id}/rotate-secret", rotate_subscription_secret, methods=["POST"],
          name="subscription_rotate_secret"),
]
