"""Event ingest: ``POST /v1/events`` and ``/v1/events/batch``, answered 202 only once RabbitMQ confirmed."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.metrics import EVENTS_ACCEPTED, PUBLISH_CONFIRM_SECONDS
from consumers.publisher import STRUCTURED_MEDIA_TYPE, ConfirmingPublisher, OutgoingMessage, PublishError, event_message
from consumers.store.database import utcnow
from gateway.auth import Principal, authenticate
from gateway.problems import Problem
from schemas import topology
from schemas.events import (
    MAX_BATCH_EVENTS,
    CloudEvent,
    EnvelopeError,
    event_from_binary,
    event_from_json,
    is_json_media_type,
)
from schemas.keys import Scope
from schemas.settings import Settings

__all__ = ["routes"]

log = structlog.get_logger(__name__)

STRUCTURED = STRUCTURED_MEDIA_TYPE
BATCH = "application/cloudevents-batch+json"
_MAX_IDEMPOTENCY_KEY = 256
_CE_HEADER = "ce-"
_ACCEPTED = EVENTS_ACCEPTED.labels(outcome="accepted")
_REJECTED = EVENTS_ACCEPTED.labels(outcome="rejected")
_UNAVAILABLE = EVENTS_ACCEPTED.labels(outcome="unavailable")
# A batch's log lines list this many of its ids at most: a line stays a few KB. The 202 lists them
# all, and the router writes a line per event with its id.
_LOGGED_BATCH_IDS = 20


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}", title="Malformed JSON") from exc


def _invalid(exc: EnvelopeError, index: int | None = None) -> Problem:
    if index is None:
        return Problem(422, exc.detail, title="Invalid event", errors=exc.errors)
    return Problem(422, f"event {index} of the batch: {exc.detail}", title="Invalid event", errors=exc.errors,
                   index=index)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= _MAX_IDEMPOTENCY_KEY:
        raise Problem(400, f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters", title="Bad header")
    return key


def _binary_attributes(request: Request) -> dict[str, str]:
    # The HTTP binding percent-encodes header values that are not printable ASCII.
    return {
        name[len(_CE_HEADER):]: unquote(value)
        for name, value in request.headers.items()
        if name.startswith(_CE_HEADER)
    }


def _stamped(event: CloudEvent, accepted_at: str) -> OutgoingMessage:
    # The router stores the stamp as the event's received_at: the delivery latency counts from here.
    return event_message(event, {topology.ACCEPTED_AT_HEADER: accepted_at})


async def _publish(request: Request, events: Sequence[CloudEvent]) -> None:
    publisher: ConfirmingPublisher = request.app.state.publisher
    settings: Settings = request.app.state.settings
    started = time.perf_counter()
    accepted_at = utcnow().isoformat()
    try:
        await publisher.publish([_stamped(event, accepted_at) for event in events])
    except PublishError as exc:
        _UNAVAILABLE.inc(len(events))
        log.warning("ingest_not_confirmed", events=len(events), error=str(exc))
        raise Problem(
            503,
            f"the event was not confirmed by the broker ({exc}); it may or may not have been stored, so retry "
            "with the same id or Idempotency-Key and it will be delivered once",
            title="Broker unavailable",
            headers={"Retry-After": str(settings.broker_retry_after_s)},
        ) from exc
    PUBLISH_CONFIRM_SECONDS.observe(time.perf_counter() - started)
    _ACCEPTED.inc(len(events))


def _accepted(content: dict[str, Any]) -> Response:
    return Response(orjson.dumps(content), status_code=202, media_type="application/json")


async def post_event(request: Request) -> Response:
    principal: Principal = await authenticate(request, Scope.EVENTS_WRITE)
    forced_id = _idempotency_key(request)
    media = _media_type(request)
    try:
        if "ce-specversion" in request.headers:
            event = event_from_binary(_binary_attributes(request), await request.body(),
                                      request.headers.get("content-type"),
                                      default_source=principal.default_source, forced_id=forced_id)
        elif media == STRUCTURED:
            obj = await _json_body(request)
            if isinstance(obj, dict) and "specversion" not in obj:
                raise EnvelopeError("a structured CloudEvent needs specversion")
            event = event_from_json(obj, default_source=principal.default_source, forced_id=forced_id)
        elif media and is_json_media_type(media):
            event = event_from_json(await _json_body(request), default_source=principal.default_source,
                                    forced_id=forced_id)
        else:
            raise Problem(415, f"unsupported content type {media or '(none)'!r}: send application/json, "
                          f"{STRUCTURED}, or a binary-mode CloudEvent with ce-* headers", title="Unsupported media")
    except EnvelopeError as exc:
        raise _invalid(exc) from exc
    structlog.contextvars.bind_contextvars(event_id=event.id)
    await _publish(request, [event])
    return _accepted({"id": event.id})


async def post_batch(request: Request) -> Response:
    principal: Principal = await authenticate(request, Scope.EVENTS_WRITE)
    if "idempotency-key" in request.headers:
        raise Problem(400, "Idempotency-Key applies to single events; give each event of a batch its own id",
                      title="Bad header")
    media = _media_type(request)
    if media != BATCH and media != "application/json":
        raise Problem(415, f"unsupported content type {media or '(none)'!r}: send a JSON array as "
                      f"application/json or {BATCH}", title="Unsupported media")
    items = await _json_body(request)
    if not isinstance(items, list) or not items:
        raise Problem(422, "a batch is a non-empty JSON array of events", title="Invalid batch")
    if len(items) > MAX_BATCH_EVENTS:
        raise Problem(422, f"a batch holds at most {MAX_BATCH_EVENTS} events", title="Invalid batch")
    events: list[CloudEvent] = []
    for index, item in enumerate(items):
        try:
            if media == BATCH and not (isinstance(item, dict) and "specversion" in item):
                raise EnvelopeError(f"event {index} of a {BATCH} batch needs specversion")
            events.append(event_from_json(item, default_source=principal.default_source))
        except EnvelopeError as exc:
            raise _invalid(exc, index) from exc
    structlog.contextvars.bind_contextvars(event_count=len(events),
                                           event_ids=[event.id for event in events[:_LOGGED_BATCH_IDS]])
    await _publish(request, events)
    return _accepted({"ids": [event.id for event in events]})


_Endpoint = Callable[[Request], Awaitable[Response]]


def _counting_rejections(endpoint: _Endpoint) -> _Endpoint:
    @functools.wraps(endpoint)
    async def counted(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Problem as exc:
            # Invalid requests only: a missing key is not an event refused, and a 503 is counted per event.
            if 400 <= exc.status < 500 and exc.status not in (401, 403):
                _REJECTED.inc()
            raise

    return counted


routes = [
    Route("/v1/events", _counting_rejections(post_event), methods=["POST"]),
    Route("/v1/events/batch", _counting_rejections(post_batch), methods=["POST"]),
]
