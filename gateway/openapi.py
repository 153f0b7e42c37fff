"""The OpenAPI 3.1 description of every route, written as data, with schemas from the pydantic models."""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.problems import PROBLEM_MEDIA_TYPE
from gateway.routes.subscriptions import PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX
from schemas.deliveries import (
    DeliveryOut,
    DeliveryPage,
    DeliveryStatus,
    EventDeliveries,
    RecoverRequest,
    RecoverResult,
)
from schemas.events import CloudEvent
from schemas.jobs import FileFormat, ImportFromUrl, JobKind, JobOut, QueuesOut, ReportRequest, TaskOut
from schemas.subscriptions import (
    SecretRotation,
    SubscriptionCreate,
    SubscriptionOut,
    SubscriptionPage,
    SubscriptionSecret,
    SubscriptionUpdate,
)

__all__ = ["openapi_document", "routes"]

_REF = "#/components/schemas/{model}"
_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (SubscriptionCreate, "validation"),
    (SubscriptionUpdate, "validation"),
    (SubscriptionOut, "serialization"),
    (SubscriptionPage, "serialization"),
    (SecretRotation, "validation"),
    (SubscriptionSecret, "serialization"),
    (EventDeliveries, "serialization"),
    (DeliveryOut, "serialization"),
    (DeliveryPage, "serialization"),
    (RecoverRequest, "validation"),
    (RecoverResult, "serialization"),
    (ImportFromUrl, "validation"),
    (ReportRequest, "validation"),
    (JobOut, "serialization"),
    (TaskOut, "serialization"),
    (QueuesOut, "serialization"),
]

_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An RFC 9457 problem; some carry more members (`errors` on 422, `checks` on /readyz).",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "format": "uri-reference", "default": "about:blank"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "additionalProperties": True,
}

_PLAIN_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A plain event; hookgate wraps it in a CloudEvent. `source` defaults to the API key's URN.",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "maxLength": 255, "description": "Dot-separated words; the routing key."},
        "source": {"type": "string", "minLength": 1, "maxLength": 1024},
        "data": {"description": "Any JSON value."},
        "id": {"type": "string", "minLength": 1, "maxLength": 256, "description": "Generated when absent."},
        "subject": {"type": "string", "maxLength": 1024},
        "time": {"type": "string", "format": "date-time"},
    },
    "additionalProperties": False,
}

_STATUS_DESCRIPTIONS = {
    400: "The body is not valid JSON.",
    401: "The API key is missing, unknown or revoked.",
    403: "The API key lacks the scope this route needs.",
    404: "Nothing has this id.",
    405: "The method is not allowed on this path.",
    409: "The request conflicts with the resource's state: several events have this id (repeat with "
    "`?source=`), a delivery or subscription that is not in a state for it, or a subscription without a secret.",
    413: "The body is larger than the configured limit.",
    415: "The body's content type is not accepted here.",
    422: "The body is JSON but not valid; `errors` lists each field.",
    503: "A dependency (broker or store) is unavailable; see `Retry-After`.",
}

_RESPONSE_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer realm=\"hookgate\"`."}},
    405: {"Allow": {"schema": {"type": "string"}, "description": "The methods this path accepts."}},
    503: {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}},
}


def _problems(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/Problem{status}"} for status in statuses}


def _json(schema: dict[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    return {"content": {media_type: {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


_AUTH = [{"bearer": []}]
_PATH_ID = {"in": "path", "required": True, "schema": {"type": "string"}}


def _binary_headers() -> list[dict[str, Any]]:
    described = {
        "ce-specversion": "Binary mode: `1.0`. Its presence selects binary mode; the body is then `data`.",
        "ce-type": "Binary mode: the event type.",
        "ce-source": "Binary mode: the event source (defaults to the API key's URN).",
        "ce-id": "Binary mode: the event id (generated when absent).",
        "ce-subject": "Binary mode: the subject.",
        "ce-time": "Binary mode: the event time (RFC 3339).",
    }
    return [
        {"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": text}
        for name, text in described.items()
    ]


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
    "description": "Sets the event id, so a retried request is delivered once.",
}


def _paths() -> dict[str, Any]:
    ingest_errors = _problems(400, 401, 403, 413, 415, 422, 503)
    return {
        "/v1/events": {
            "post": {
                "operationId": "publishEvent",
                "summary": "Publish one event",
                "description": "Answers 202 only once RabbitMQ has confirmed the event. Plain JSON, CloudEvents "
                "structured mode, or binary mode (`ce-*` headers, any body content type).",
                "security": _AUTH,
                "parameters": [_IDEMPOTENCY_KEY, *_binary_headers()],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("PlainEvent")},
                        "application/cloudevents+json": {"schema": _ref("StructuredCloudEvent")},
                        "*/*": {"schema": {"description": "Binary mode: the event's data, with `ce-*` headers."}},
                    },
                },
                "responses": {
                    "202": {"description": "Accepted and durable.", **_json(_ref("Accepted"))},
                    **ingest_errors,
                },
            }
        },
        "/v1/events/batch": {
            "post": {
                "operationId": "publishEvents",
                "summary": "Publish many events in one request",
                "description": "All or nothing: 202 once RabbitMQ has confirmed every event.",
                "security": _AUTH,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"type": "array", "items": _ref("PlainEvent")}},
                        "application/cloudevents-batch+json": {
                            "schema": {"type": "array", "items": _ref("StructuredCloudEvent")}
                        },
                    },
                },
                "responses": {
                    "202": {"description": "Accepted and durable, ids in order.", **_json(_ref("AcceptedBatch"))},
                    **ingest_errors,
                },
            }
        },
        "/v1/events/{event_id}": {
            "get": {
                "operationId": "getEvent",
                "summary": "An event with its deliveries and their attempts",
                "security": _AUTH,
                "parameters": [
                    {"name": "event_id", **_PATH_ID},
                    {
                        "name": "source",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "The event's source; needed when several sources used this id.",
                    },
                ],
                "responses": {
                    "200": {"description": "The event.", **_json(_ref("EventDeliveries"))},
                    **_problems(401, 403, 404, 409, 503),
                },
            }
        },
        "/v1/subscriptions": {
            "get": {
                "operationId": "listSubscriptions",
                "summary": "Subscriptions, oldest first, without secrets",
                "security": _AUTH,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": PAGE_LIMIT_MAX,
                            "default": PAGE_LIMIT_DEFAULT,
                        },
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "The previous page's `next_after`.",
                    },
                ],
                "responses": {
                    "200": {"description": "One page.", **_json(_ref("SubscriptionPage"))},
                    **_problems(401, 403, 422, 503),
                },
            },
            "post": {
                "operationId": "createSubscription",
                "summary": "Create a subscription; the answer carries its signing secret",
                "security": _AUTH,
                "requestBody": {"required": True, **_json(_ref("SubscriptionCreate"))},
                "responses": {
                    "201": {"description": "Created, with `secret`.", **_json(_ref("SubscriptionOut"))},
                    **_problems(400, 401, 403, 413, 415, 422, 503),
                },
            },
        },
        "/v1/subscriptions/{subscription_id}": {
            "parameters": [{"name": "subscription_id", **_PATH_ID}],
            "get": {
                "operationId": "getSubscription",
                "summary": "A subscription, without its secret",
                "security": _AUTH,
                "responses": {
                    "200": {"description": "The subscription.", **_json(_ref("SubscriptionOut"))},
                    **_problems(401, 403, 404, 503),
                },
            },
            "patch": {
                "operationId": "updateSubscription",
                "summary": "Change the fields sent; null resets retry_schedule, rate_limit_per_s, max_in_flight",
                "description": "Re-enabling (`enabled: true`) clears `disabled_reason`.",
                "security": _AUTH,
                "requestBody": {"required": True, **_json(_ref("SubscriptionUpdate"))},
                "responses": {
                    "200": {"description": "The subscription as changed.", **_json(_ref("SubscriptionOut"))},
                    **_problems(400, 401, 403, 404, 413, 415, 422, 503),
                },
            },
            "delete": {
                "operationId": "deleteSubscription",
                "summary": "Delete a subscription; its pending and retrying deliveries are cancelled",
                "security": _AUTH,
                "responses": {"204": {"description": "Deleted."}, **_problems(401, 403, 404, 503)},
            },
        },
        "/v1/subscriptions/{subscription_id}/secret": {
            "get": {
                "operationId": "getSubscriptionSecret",
                "summary": "A subscription's signing secret",
                "security": _AUTH,
                "parameters": [{"name": "subscription_id", **_PATH_ID}],
                "responses": {
                    "200": {"description": "The secret.", **_json(_ref("SubscriptionSecret"))},
                    **_problems(401, 403, 404, 409, 503),
                },
            }
        },
        "/v1/subscriptions/{subscription_id}/rotate-secret": {
            "post": {
                "operationId": "rotateSubscriptionSecret",
                "summary": "Issue a new signing secret; the old one keeps signing during the grace period",
                "description": "Until `previous_secret_expires_at` (`HOOKGATE_SECRET_ROTATION_GRACE_S` after the "
                "rotation) every request carries both signatures, space-separated. Without a body the new "
                "secret is generated.",
                "security": _AUTH,
                "parameters": [{"name": "subscription_id", **_PATH_ID}],
                "requestBody": {"required": False, **_json(_ref("SecretRotation"))},
                "responses": {
                    "200": {"description": "The new secret, shown this once.", **_json(_ref("SubscriptionSecret"))},
                    **_problems(400, 401, 403, 404, 409, 413, 415, 422, 503),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is alive",
                "security": [],
                "responses": {"200": {"description": "Alive.", **_json(_ref("Status"))}},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "The broker and the store both answer",
                "security": [],
                "responses": {"200": {"description": "Ready.", **_json(_ref("Status"))}, **_problems(503)},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics, in the text exposition format",
                "description": "Needs a key with the `admin` scope, unless the gateway runs with "
                "`HOOKGATE_METRICS_PUBLIC=true` for a scraper inside a trusted network.",
                "security": _AUTH,
                "responses": {
                    "200": {"description": "The metrics.", **_json({"type": "string"}, "text/plain")},
                    **_problems(401, 403),
                },
            }
        },
        **_delivery_paths(),
        **_job_paths(),
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1.", **_json({"type": "object"})}},
            }
        },
    }


def _delivery_paths() -> dict[str, Any]:
    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    return {
        "/v1/deliveries": {
            "get": {
                "operationId": "listDeliveries",
                "summary": "Deliveries, newest first, without their attempts",
                "security": _AUTH,
                "parameters": [
                    query("status", {"enum": [s.value for s in DeliveryStatus]}, "Only deliveries in this state."),
                    query("subscription_id", {"type": "string"}, "Only this subscription's deliveries."),
                    query("event_type", {"type": "string"}, "Only deliveries of events of this exact type."),
                    query("since", {"type": "string", "format": "date-time"},
                          "Only deliveries created at or after this time (with a UTC offset)."),
                    query("before", {"type": "string"}, "The `next_before` of the previous page."),
                    query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size."),
                ],
                "responses": {
                    "200": {"description": "A page of deliveries.", **_json(_ref("DeliveryPage"))},
                    **_problems(401, 403, 422, 503),
                },
            }
        },
        "/v1/deliveries/{delivery_id}": {
            "get": {
                "operationId": "getDelivery",
                "summary": "A delivery with every attempt (status, duration, response headers, first 4 KiB of body)",
                "security": _AUTH,
                "parameters": [{"name": "delivery_id", **_PATH_ID}],
                "responses": {
                    "200": {"description": "The delivery.", **_json(_ref("DeliveryOut"))},
                    **_problems(401, 403, 404, 503),
                },
            }
        },
        "/v1/deliveries/{delivery_id}/retry": {
            "post": {
                "operationId": "retryDelivery",
                "summary": "Send a dead or succeeded delivery again, on a fresh run of its retry schedule",
                "description": "The request keeps its `webhook-id` (the delivery id), so receivers can tell it "
                "is the same message.",
                "security": _AUTH,
                "parameters": [{"name": "delivery_id", **_PATH_ID}],
                "responses": {
                    "202": {"description": "Pending again and enqueued.", **_json(_ref("DeliveryOut"))},
                    **_problems(401, 403, 404, 409, 503),
                },
            }
        },
        "/v1/subscriptions/{subscription_id}/recover": {
            "post": {
                "operationId": "recoverSubscription",
                "summary": "Send again every dead delivery of this subscription for events received since a time",
                "security": _AUTH,
                "parameters": [{"name": "subscription_id", **_PATH_ID}],
                "requestBody": {"required": True, **_json(_ref("RecoverRequest"))},
                "responses": {
                    "202": {"description": "How many were enqueued again.", **_json(_ref("RecoverResult"))},
                    **_problems(400, 401, 403, 404, 409, 415, 422, 503),
                },
            }
        },
    }


def _job_paths() -> dict[str, Any]:
    csv_download = {"description": "The CSV file.", **_json({"type": "string"}, "text/csv")}
    job_id = [{"name": "job_id", **_PATH_ID}]
    return {
        "/v1/files": {
            "post": {
                "operationId": "createJob",
                "summary": "Start a heavy job: import a file (uploaded, or fetched from a URL) or build a report",
                "description": "With `?kind=import&format=ndjson|csv` the body is the file itself, streamed to disk "
                "(`HOOKGATE_MAX_FILE_BYTES`, 2 GiB by default). Without a query the body is JSON: an import from "
                "`url` (fetched by the heavy worker through the SSRF guard) or a `report` of deliveries.",
                "security": _AUTH,
                "parameters": [
                    {"name": "kind", "in": "query", "required": False, "schema": {"enum": [JobKind.IMPORT.value]},
                     "description": "`import` to upload the file as the body."},
                    {"name": "format", "in": "query", "required": False,
                     "schema": {"enum": [f.value for f in FileFormat]}, "description": "The uploaded file's format."},
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {
                            "oneOf": [_ref("ImportFromUrl"), _ref("ReportRequest")],
                            "discriminator": {"propertyName": "kind"},
                        }},
                        "*/*": {"schema": {"type": "string", "format": "binary",
                                           "description": "The file, with `?kind=import&format=...`."}},
                    },
                },
                "responses": {
                    "202": {"description": "The job, queued.", **_json(_ref("JobOut"))},
                    **_problems(400, 401, 403, 413, 415, 422, 503),
                },
            }
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "A job's state, progress (bytes and lines done of total), counts, error and links",
                "security": _AUTH,
                "parameters": job_id,
                "responses": {"200": {"description": "The job.", **_json(_ref("JobOut"))},
                              **_problems(401, 403, 404, 503)},
            }
        },
        "/v1/jobs/{job_id}/errors": {
            "get": {
                "operationId": "getJobErrors",
                "summary": "An import's error report: `line,error` for every line refused",
                "security": _AUTH,
                "parameters": job_id,
                "responses": {"200": csv_download, **_problems(401, 403, 404, 503)},
            }
        },
        "/v1/jobs/{job_id}/result": {
            "get": {
                "operationId": "getJobResult",
                "summary": "A report job's CSV of deliveries",
                "security": _AUTH,
                "parameters": job_id,
                "responses": {"200": csv_download, **_problems(401, 403, 404, 503)},
            }
        },
        "/v1/tasks/{task_id}": {
            "get": {
                "operationId": "getTask",
                "summary": "A Celery task's state (PENDING, STARTED, PROGRESS, RETRY, SUCCESS, FAILURE) and result",
                "description": "Read from the persistent result backend; an id it does not know reads PENDING, as "
                "in Celery.",
                "security": _AUTH,
                "parameters": [{"name": "task_id", **_PATH_ID}],
                "responses": {"200": {"description": "The task.", **_json(_ref("TaskOut"))},
                              **_problems(401, 403, 404, 503)},
            }
        },
        "/v1/queues": {
            "get": {
                "operationId": "listQueues",
                "summary": "Messages ready and unacknowledged, and consumers, of every hookgate queue",
                "security": _AUTH,
                "responses": {"200": {"description": "The queues.", **_json(_ref("QueuesOut"))},
                              **_problems(401, 403, 503)},
            }
        },
    }


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema(_MODELS, ref_template=_REF)
    schemas: dict[str, Any] = dict(top["$defs"])
    structured = CloudEvent.model_json_schema(ref_template=_REF)
    # On the wire, extension attributes sit beside the core ones, and id and source may be left to hookgate.
    structured["properties"].pop("extensions")
    structured["additionalProperties"] = {"type": ["string", "integer", "boolean"]}
    structured["required"] = ["specversion", "type"]
    structured["title"] = "StructuredCloudEvent"
    schemas.update(
        StructuredCloudEvent=structured,
        PlainEvent=_PLAIN_EVENT_SCHEMA,
        Problem=_PROBLEM_SCHEMA,
        Accepted={"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        AcceptedBatch={
            "type": "object",
            "required": ["ids"],
            "properties": {"ids": {"type": "array", "items": {"type": "string"}}},
        },
        Status={"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    )
    return schemas


@cache
def openapi_document() -> dict[str, Any]:
    """The whole document; built once per process."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hookgate",
            "version": "1",
            "description": "Events in over HTTP and AMQP, out as signed webhooks. Errors are RFC 9457 problems.",
        },
        "security": _AUTH,
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": {
                f"Problem{status}": {
                    "description": text,
                    **({"headers": _RESPONSE_HEADERS[status]} if status in _RESPONSE_HEADERS else {}),
                    **_json(_ref("Problem"), PROBLEM_MEDIA_TYPE),
                }
                for status, text in _STATUS_DESCRIPTIONS.items()
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key, hg_…"}},
        },
    }


@cache
def _document_bytes() -> bytes:
    return orjson.dumps(openapi_document())


async def openapi_json(_request: Request) -> Response:
    return Response(_document_bytes(), media_type="application/json")


routes = [Route("/openapi.json", openapi_json, methods=["GET"], name="openapi")]
