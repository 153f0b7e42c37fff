"""schemathesis over every operation of ``/openapi.json``, against a live ``hookgate serve``.

For each generated request: without a key, and with a wrong key, a protected operation answers
401; with a key lacking its scope, 403; with its scope, anything but a 5xx. Every 4xx is an RFC 9457
problem body. Bounded (``max_examples``) so the module runs in about a minute on 2 cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode

from consumers.store.database import make_engine, make_sessionmaker, migrate
from consumers.store.keys import create_api_key
from gateway.openapi import openapi_document
from schemas.keys import Scope
from schemas.settings import Settings
from tests.workers import Hookgate, free_port

# The scope each protected operation needs. An operation missing here fails the test: a new route
# must say which scope guards it.
SCOPES: dict[tuple[str, str], Scope] = {
    ("POST", "/v1/events"): Scope.EVENTS_WRITE,
    ("POST", "/v1/events/batch"): Scope.EVENTS_WRITE,
    ("GET", "/v1/events/{event_id}"): Scope.EVENTS_READ,
    ("GET", "/metrics"): Scope.ADMIN,
    ("GET", "/v1/deliveries"): Scope.EVENTS_READ,
    ("GET", "/v1/deliveries/{delivery_id}"): Scope.EVENTS_READ,
    ("POST", "/v1/deliveries/{delivery_id}/retry"): Scope.SUBSCRIPTIONS,
    ("POST", "/v1/files"): Scope.EVENTS_WRITE,
    ("GET", "/v1/jobs/{job_id}"): Scope.EVENTS_READ,
    ("GET", "/v1/jobs/{job_id}/errors"): Scope.EVENTS_READ,
    ("GET", "/v1/jobs/{job_id}/result"): Scope.EVENTS_READ,
    ("GET", "/v1/tasks/{task_id}"): Scope.EVENTS_READ,
    ("GET", "/v1/queues"): Scope.ADMIN,
}
_SUBSCRIPTION_PATHS = ("/v1/subscriptions",)
_EXAMPLES = 25


@dataclass(frozen=True)
class LiveGateway:
    base_url: str
    keys: dict[Scope, str]



@pytest.fixture(scope="module")
def live_gateway(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    """``hookgate serve`` on a fresh SQLite store, with one key per scope."""
    directory: Path = tmp_path_factory.mktemp("fuzz")
    database_url = f"sqlite:///{directory / 'hookgate.db'}"
    migrate(database_url)
    engine = make_engine(database_url)
    try:
        sessions = make_sessionmaker(engine)
        keys = {scope: create_api_key(sessions, f"fuzz {scope.value}", [scope])[1] for scope in Scope}
    finally:
        engine.dispose()
    port = free_port()
    # Targets must resolve: generated URLs name hosts that do not, so no subscription is ever live.
    settings_ = Settings(broker_url=broker_url, database_url=database_url, port=port, log_format="json",
                         files_dir=directory / "files")
    gateway = Hookgate(settings_, directory / "serve.log", "serve", "--port", str(port))
    gateway.start()
    try:
        yield LiveGateway(f"http://127.0.0.1:{port}", keys)
    finally:
        gateway.stop()


# Generated from the document the gateway serves; the test checks the live /openapi.json is this one.
_SCHEMA = schemathesis.openapi.from_dict(openapi_document())
_OPERATIONS = [result.ok() for result in _SCHEMA.get_all_operations()]


def _scope(case: Case) -> Scope | None:
    """The scope the operation needs; None when it is public (``security: []``)."""
    operation = case.operation
    if operation.definition.raw.get("security") == []:
        return None
    if operation.path.startswith(_SUBSCRIPTION_PATHS):
        return Scope.SUBSCRIPTIONS
    key = (operation.method.upper(), operation.path)
    assert key in SCOPES, f"{key} is protected but the test does not know its scope: add it to SCOPES"
    return SCOPES[key]


def _send(session: requests.Session, case: Case, base_url: str, authorization: str | None) -> requests.Response:
    """Send the generated request with our Authorization (or none), whatever the case generated for it.

    schemathesis's own ``case.call`` drops a caller's Authorization header in the cases that negate
    the security requirement, so the request is built from the case and sent here.
    """
    kwargs = case.as_transport_kwargs(base_url=base_url)
    headers = {k: v for k, v in kwargs.pop("headers", {}).items() if k.lower() != "authorization"}
    if authorization is not None:
        headers["Authorization"] = authorization
    response = session.request(**kwargs, headers=headers, timeout=30, allow_redirects=False)
    _check(response, case, f"{authorization or 'no key'}: {kwargs} {headers}")
    return response


def _refused(response: requests.Response, status: int) -> bool:
    """Refused before the route ran: ``status``, or a body over the size limit (413), or a path no route
    matches (404 from routing, e.g. an id with a newline, which the path converter does not take)."""
    return response.status_code in (status, 413) or (
        response.status_code == 404 and response.json()["detail"].startswith("there is nothing at")
    )


def _check(response: requests.Response, case: Case, what: str) -> None:
    status = response.status_code
    assert status < 500, f"{what}: {case.method} {case.formatted_path} answered {status}: {response.text[:500]}"
    if status >= 400:
        assert response.headers.get("content-type") == "application/problem+json", (what, response.headers)
        body = response.json()
        assert body["status"] == status and body["title"] and body["detail"], body


def test_the_live_document_is_the_one_fuzzed(live_gateway: LiveGateway) -> None:
    """The operations fuzzed below are exactly those the running gateway documents."""
    assert httpx.get(f"{live_gateway.base_url}/openapi.json").json() == openapi_document()


@pytest.mark.parametrize("operation", _OPERATIONS, ids=lambda operation: operation.label)
def test_every_operation_guards_its_scope_and_answers_problems(operation: APIOperation,
                                                               live_gateway: LiveGateway) -> None:
    """No key or a wrong key: 401; a key without the scope: 403; with it: never a 5xx; every 4xx a problem.

    Requests are generated valid and invalid (schemathesis's positive and negative modes).
    """
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(strategy)
    @settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def exchange(case: Case) -> None:
        _exchange(case, live_gateway)

    exchange()


def _exchange(case: Case, live_gateway: LiveGateway) -> None:
    needed = _scope(case)
    base = live_gateway.base_url
    with requests.Session() as session:
        if needed is None:
            _send(session, case, base, None)
            return
        for authorization in (None, "Bearer hg_not-a-key"):
            response = _send(session, case, base, authorization)
            # A body over the size limit is refused before anyone looks at the key.
            assert _refused(response, 401), (authorization, response.request.url, response.status_code,
                                             response.text[:300])
        for scope in Scope:
            if scope in (needed, Scope.ADMIN):
                continue
            response = _send(session, case, base, f"Bearer {live_gateway.keys[scope]}")
            assert _refused(response, 403), (scope, response.request.url, response.status_code, response.text[:300])
        for scope in {needed, Scope.ADMIN}:
            response = _send(session, case, base, f"Bearer {live_gateway.keys[scope]}")
            assert response.status_code not in (401, 403), (scope, response.status_code, response.text[:300])
