"""``/openapi.json`` is a valid OpenAPI 3.1 document that describes exactly the routes the app serves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from openapi_spec_validator import validate
from starlette.endpoints import HTTPEndpoint
from starlette.routing import Route

from schemas.settings import Settings
from tests.apiclient import Gateway, running_gateway

_METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], sqlite_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(database_url=sqlite_url)) as gw:
        yield gw


@pytest.fixture
async def document(gateway: Gateway) -> dict[str, Any]:
    response = await gateway.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    return response.json()


def served_operations(gateway: Gateway) -> set[tuple[str, str]]:
    """(path, method) for every route of the app, HEAD left out (Starlette adds it to every GET)."""
    operations: set[tuple[str, str]] = set()
    for route in gateway.app.routes:
        assert isinstance(route, Route), f"{route!r} is not a plain route: teach this test about it"
        if isinstance(route.endpoint, type) and issubclass(route.endpoint, HTTPEndpoint):
            methods = {m for m in _METHODS if hasattr(route.endpoint, m)}
        else:
            methods = {m.lower() for m in route.methods or ()} - {"head"}
        operations |= {(route.path_format, method) for method in methods}
    return operations


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    """The document passes the OpenAPI 3.1 validator, references and all."""
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_is_documented_and_nothing_else(gateway: Gateway, document: dict[str, Any]) -> None:
    """Each (path, method) the app serves is in the document, and the document describes no other."""
    documented = {(path, method) for path, item in document["paths"].items() for method in item if method in _METHODS}
    assert documented == served_operations(gateway)
    assert ("/v1/events", "post") in documented and ("/v1/events/batch", "post") in documented


_PUBLIC_PATHS = {"/healthz", "/readyz", "/openapi.json"}


def test_protected_operations_use_bearer_auth_and_problem_errors(document: dict[str, Any]) -> None:
    """Every operation but the probes and this document requires the bearer scheme and answers 401 with a problem."""
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key, hg_…",
    }
    problem_401 = document["components"]["responses"]["Problem401"]
    assert "application/problem+json" in problem_401["content"]
    for path, item in document["paths"].items():
        for method, operation in ((m, o) for m, o in item.items() if m in _METHODS):
            if path in _PUBLIC_PATHS:
                assert operation["security"] == [], (path, method)
            else:
                assert operation["security"] == [{"bearer": []}], (path, method)
                assert operation["responses"]["401"] == {"$ref": "#/components/responses/Problem401"}


def test_ingest_documents_every_accepted_form(document: dict[str, Any]) -> None:
    """POST /v1/events lists plain JSON, structured and binary mode, Idempotency-Key and its error statuses."""
    operation = document["paths"]["/v1/events"]["post"]
    assert set(operation["requestBody"]["content"]) == {"application/json", "application/cloudevents+json", "*/*"}
    headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
    assert {"Idempotency-Key", "ce-specversion", "ce-type", "ce-source", "ce-id"} <= headers
    assert set(operation["responses"]) == {"202", "400", "401", "403", "413", "415", "422", "503"}
    batch = document["paths"]["/v1/events/batch"]["post"]
    assert set(batch["requestBody"]["content"]) == {"application/json", "application/cloudevents-batch+json"}
    assert document["components"]["schemas"]["AcceptedBatch"]["properties"]["ids"]["type"] == "array"


def test_subscription_schemas_come_from_the_models(document: dict[str, Any]) -> None:
    """The subscription schemas are pydantic's, so a field added to a model shows up here."""
    schemas = document["components"]["schemas"]
    assert set(schemas["SubscriptionCreate"]["required"]) == {"event_types"}
    assert "secret" in schemas["SubscriptionOut"]["properties"]
    page_items = schemas["SubscriptionPage"]["properties"]["items"]["items"]
    assert page_items == {"$ref": "#/components/schemas/SubscriptionOut"}
    assert schemas["Channel"]["enum"] == ["webhook", "email", "task"]
