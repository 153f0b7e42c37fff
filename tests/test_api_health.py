"""``/healthz`` and ``/readyz`` against a real broker and store, and with each of them down."""

from __future__ import annotations

from collections.abc import Callable

from schemas.settings import Settings
from tests.apiclient import assert_problem, running_gateway

# Nothing listens on port 1: connecting is refused at once.
CLOSED_BROKER = "amqp://guest:guest@127.0.0.1:1//"
CLOSED_STORE = "postgresql://postgres@127.0.0.1:1/hookgate"


async def test_healthz_answers_without_a_key(make_settings: Callable[..., Settings], sqlite_url: str) -> None:
    """`/healthz` says the process is alive, without auth, even with the broker down."""
    async with running_gateway(make_settings(database_url=sqlite_url, broker_url=CLOSED_BROKER)) as gateway:
        response = await gateway.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_200_when_broker_and_store_answer(
    make_settings: Callable[..., Settings], store_url: str
) -> None:
    """With the publisher connected and the store answering, `/readyz` is 200 and says so per check."""
    async with running_gateway(make_settings(database_url=store_url)) as gateway:
        assert await gateway.app.state.publisher.wait_connected(10)
        response = await gateway.client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "checks": {"broker": "up", "store": "up"}}


async def test_readyz_is_503_naming_the_broker_when_it_is_unreachable(
    make_settings: Callable[..., Settings], sqlite_url: str
) -> None:
    """With the broker URL on a closed port, `/readyz` is a 503 problem that names the broker only."""
    async with running_gateway(make_settings(database_url=sqlite_url, broker_url=CLOSED_BROKER)) as gateway:
        response = await gateway.client.get("/readyz")
    body = assert_problem(response, 503)
    assert body["checks"] == {"broker": "down", "store": "up"}
    assert "broker" in body["detail"] and "store" not in body["detail"]
    assert int(response.headers["retry-after"]) > 0


async def test_readyz_is_503_naming_the_store_when_it_is_unreachable(make_settings: Callable[..., Settings]) -> None:
    """With the database on a closed port, `/readyz` is a 503 problem that names the store."""
    async with running_gateway(make_settings(database_url=CLOSED_STORE)) as gateway:
        assert await gateway.app.state.publisher.wait_connected(10)
        response = await gateway.client.get("/readyz")
    body = assert_problem(response, 503)
    assert body["checks"] == {"broker": "up", "store": "down"}
    assert "store" in body["detail"]
