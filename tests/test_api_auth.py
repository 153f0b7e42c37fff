"""Bearer API keys on the real app: 401 and 403 problems, scopes, and the key cache's promises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, event

from consumers.store.keys import create_api_key, revoke_api_key
from gateway.auth import KeyCache, Principal
from schemas.keys import Scope
from schemas.settings import Settings
from tests.apiclient import Gateway, assert_problem, running_gateway

# A route that needs the `subscriptions` scope and answers 200 from the store.
GUARDED = "/v1/subscriptions"


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings], store_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(database_url=store_url)) as gw:
        yield gw


@contextmanager
def counting_queries(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement the engine runs inside the block."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def key_lookups(statements: list[str]) -> list[str]:
    # SQLite sessions also run a BEGIN of their own; only the key lookups themselves matter here.
    return [s for s in statements if "FROM api_keys" in s]


async def test_a_missing_key_is_a_401_problem_with_a_bearer_challenge(gateway: Gateway) -> None:
    """Without an Authorization header the answer is 401 with `WWW-Authenticate: Bearer`."""
    response = await gateway.client.get(GUARDED)
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in body["detail"]


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "hg_abc"])
async def test_a_malformed_authorization_header_is_a_401(gateway: Gateway, header: str) -> None:
    """Schemes other than Bearer, and Bearer without a token, are refused with 401."""
    response = await gateway.client.get(GUARDED, headers={"Authorization": header})
    assert_problem(response, 401)
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_an_unknown_key_is_a_401(gateway: Gateway) -> None:
    """A well-formed key that was never issued is refused with 401."""
    response = await gateway.client.get(GUARDED, headers={"Authorization": "Bearer hg_" + "x" * 43})
    body = assert_problem(response, 401)
    assert "unknown or revoked" in body["detail"]


async def test_a_revoked_key_is_a_401(gateway: Gateway) -> None:
    """A key revoked before it was ever used is refused with 401."""
    key_id, plaintext = create_api_key(gateway.sessions, "old", [Scope.ADMIN])
    revoke_api_key(gateway.sessions, key_id)
    response = await gateway.client.get(GUARDED, headers={"Authorization": f"Bearer {plaintext}"})
    assert_problem(response, 401)


async def test_a_key_without_the_scope_is_a_403(gateway: Gateway) -> None:
    """A valid key lacking the route's scope gets 403 naming the scope, not 401."""
    response = await gateway.client.get(GUARDED, headers=gateway.auth(Scope.EVENTS_WRITE, Scope.EVENTS_READ))
    body = assert_problem(response, 403)
    assert "'subscriptions'" in body["detail"]
    assert "www-authenticate" not in response.headers


async def test_the_scope_or_admin_lets_the_request_through(gateway: Gateway) -> None:
    """The route's own scope and the admin scope are both enough."""
    for scope in (Scope.SUBSCRIPTIONS, Scope.ADMIN):
        response = await gateway.client.get(GUARDED, headers=gateway.auth(scope))
        assert response.status_code == 200, response.text


async def test_the_bearer_scheme_is_case_insensitive(gateway: Gateway) -> None:
    """`bearer KEY` works as `Bearer KEY` does (RFC 9110 schemes are case-insensitive)."""
    key = gateway.key(Scope.ADMIN)
    response = await gateway.client.get(GUARDED, headers={"Authorization": f"bearer {key}"})
    assert response.status_code == 200, response.text


async def test_a_warm_cache_answers_without_touching_the_store(gateway: Gateway) -> None:
    """Once a key was seen, authenticating it again runs no SQL at all."""
    headers = gateway.auth(Scope.EVENTS_READ)
    with counting_queries(gateway.app.state.engine) as cold:
        assert_problem(await gateway.client.get(GUARDED, headers=headers), 403)
    assert len(key_lookups(cold)) == 1
    with counting_queries(gateway.app.state.engine) as warm:
        for _ in range(20):
            assert_problem(await gateway.client.get(GUARDED, headers=headers), 403)
    assert warm == []


async def test_concurrent_misses_for_one_key_share_one_lookup(gateway: Gateway) -> None:
    """Fifty simultaneous first requests with one key look it up in the store once."""
    headers = gateway.auth(Scope.EVENTS_READ)
    with counting_queries(gateway.app.state.engine) as statements:
        responses = await asyncio.gather(*(gateway.client.get(GUARDED, headers=headers) for _ in range(50)))
    assert {r.status_code for r in responses} == {403}
    assert len(key_lookups(statements)) == 1


async def test_unknown_keys_are_remembered_briefly(gateway: Gateway) -> None:
    """Repeating an unknown key within the negative TTL does not query the store again."""
    headers = {"Authorization": "Bearer hg_" + "u" * 43}
    with counting_queries(gateway.app.state.engine) as statements:
        for _ in range(10):
            assert_problem(await gateway.client.get(GUARDED, headers=headers), 401)
    assert len(key_lookups(statements)) == 1


async def test_a_revoked_key_stops_working_once_the_ttl_has_passed(
    make_settings: Callable[..., Settings], store_url: str
) -> None:
    """Revocation reaches a gateway that cached the key within `api_key_cache_ttl_s`, not before."""
    async with running_gateway(make_settings(database_url=store_url, api_key_cache_ttl_s=1.0)) as gateway:
        key_id, plaintext = create_api_key(gateway.sessions, "soon revoked", [Scope.SUBSCRIPTIONS])
        headers = {"Authorization": f"Bearer {plaintext}"}
        assert (await gateway.client.get(GUARDED, headers=headers)).status_code == 200
        revoke_api_key(gateway.sessions, key_id)
        assert (await gateway.client.get(GUARDED, headers=headers)).status_code == 200  # still cached
        await asyncio.sleep(1.1)
        assert_problem(await gateway.client.get(GUARDED, headers=headers), 401)


async def test_the_cache_is_bounded_and_drops_the_oldest_key(gateway: Gateway) -> None:
    """With room for two keys, a third pushes out the first, which is then looked up again."""
    cache = KeyCache(gateway.app.state.read_sessions, ttl_s=60, max_entries=2)
    keys = [gateway.key(Scope.ADMIN) for _ in range(3)]
    with counting_queries(gateway.app.state.engine) as statements:
        for key in keys:
            assert await cache.principal(key) is not None
        assert await cache.principal(keys[2]) is not None
        assert len(key_lookups(statements)) == 3
        assert await cache.principal(keys[0]) is not None
        assert len(key_lookups(statements)) == 4


def test_a_principal_sources_events_from_its_key_urn() -> None:
    """Events sent without a source get `urn:hookgate:key:<key id>`; admin implies every scope."""
    principal = Principal(key_id="k1", name="n", scopes=frozenset({Scope.ADMIN}))
    assert principal.default_source == "urn:hookgate:key:k1"
    assert all(principal.allows(scope) for scope in Scope)
    assert not Principal(key_id="k2", name="n", scopes=frozenset({Scope.EVENTS_READ})).allows(Scope.EVENTS_WRITE)
