"""Every error is an RFC 9457 problem: routing errors, body limits, store outages and crashes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consumers.store.models import Subscription
from gateway.problems import BodyLimit, Problem, exception_handlers, problem_response
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, assert_problem, count_rows, running_gateway

LIMIT = 1024


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(database_url=store_url, max_body_bytes=LIMIT)) as gw:
        yield gw


def _subscription(padding: int = 0) -> dict[str, object]:
    return {"event_types": ["order.*"], "url": "http://127.0.0.1:9/hook", "description": "x" * padding}


async def test_an_unknown_path_is_a_404_problem(gateway: Gateway) -> None:
    """A path no route matches answers 404 with a problem naming the path."""
    body = assert_problem(await gateway.client.get("/v2/nothing"), 404)
    assert "/v2/nothing" in body["detail"]


async def test_a_wrong_method_is_a_405_problem_with_allow(gateway: Gateway) -> None:
    """PUT on a subscription answers 405 listing the methods it does accept."""
    response = await gateway.client.put("/v1/subscriptions/abc", json={})
    body = assert_problem(response, 405)
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert {"GET", "PATCH", "DELETE"} <= allowed
    assert "PUT" in body["detail"]


async def test_a_declared_body_over_the_limit_is_a_413_problem_and_stores_nothing(gateway: Gateway) -> None:
    """A Content-Length above `max_body_bytes` gets a 413 problem, not Starlette's plain text, and no row."""
    headers = gateway.auth(Scope.SUBSCRIPTIONS)
    response = await gateway.client.post("/v1/subscriptions", json=_subscription(2 * LIMIT), headers=headers)
    body = assert_problem(response, 413)
    assert str(LIMIT) in body["detail"]
    assert count_rows(gateway.sessions, Subscription) == 0


async def test_a_streamed_body_over_the_limit_is_a_413_problem_and_stores_nothing(gateway: Gateway) -> None:
    """A chunked body without Content-Length is cut off at the limit with a 413 problem."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * (LIMIT // 2)

    headers = {**gateway.auth(Scope.SUBSCRIPTIONS), "Content-Type": "application/json"}
    response = await gateway.client.post("/v1/subscriptions", content=chunks(), headers=headers)
    assert_problem(response, 413)
    assert count_rows(gateway.sessions, Subscription) == 0


async def test_a_body_at_the_limit_is_accepted(gateway: Gateway) -> None:
    """The limit is inclusive: a body of exactly `max_body_bytes` goes through."""
    headers = gateway.auth(Scope.SUBSCRIPTIONS)
    content = httpx.Request("POST", "/", json=_subscription()).content
    padded = _subscription(LIMIT - len(content))
    raw = httpx.Request("POST", "/", json=padded).content
    assert len(raw) == LIMIT
    response = await gateway.client.post(
        "/v1/subscriptions", content=raw, headers={**headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text


async def test_a_store_outage_is_a_503_problem_with_retry_after(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """When the database fails (here: never migrated), requests get 503 and Retry-After, not a 500."""
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    async with running_gateway(settings) as gateway:
        response = await gateway.client.get("/v1/subscriptions", headers={"Authorization": "Bearer hg_" + "k" * 43})
    body = assert_problem(response, 503)
    assert int(response.headers["retry-after"]) > 0
    assert "hg_" not in body["detail"]


async def test_an_unexpected_error_is_a_500_problem_that_hides_the_exception() -> None:
    """A crash in a route answers a 500 problem that does not leak the exception's message."""

    async def crash(_request: Request) -> Response:
        raise RuntimeError("secret internals")

    app = Starlette(routes=[Route("/crash", crash)], exception_handlers=exception_handlers())
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/crash")
    assert_problem(response, 500)
    assert "secret internals" not in response.text


async def test_a_problem_carries_its_headers_and_extra_members() -> None:
    """`Problem` extras join the body and its headers are sent, through the app's handlers."""

    async def busy(_request: Request) -> Response:
        raise Problem(503, "try later", headers={"Retry-After": "7"}, checks={"broker": "down"})

    app = Starlette(
        routes=[Route("/busy", busy)],
        middleware=[Middleware(BodyLimit, max_bytes=10)],
        exception_handlers=exception_handlers(),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        response = await client.get("/busy")
    body = assert_problem(response, 503)
    assert response.headers["retry-after"] == "7"
    assert body["checks"] == {"broker": "down"}
    assert body["title"] == "Service Unavailable"


def test_problem_response_renders_rfc_9457_members() -> None:
    """A problem response has type, title, status and detail, and the problem+json media type."""
    response = problem_response(422, "bad", title="Invalid", errors=[{"field": "a", "message": "b"}])
    assert response.media_type == "application/problem+json"
    assert response.body == (
        b'{"type":"about:blank","title":"Invalid","status":422,"detail":"bad",'
        b'"errors":[{"field":"a","message":"b"}]}'
    )
