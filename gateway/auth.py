"""Bearer API keys: who is calling, and may they do this? Cached so the hot path never waits on the store."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from consumers.store.keys import lookup_api_key
from gateway.problems import Problem
from schemas.keys import Scope

__all__ = ["KeyCache", "Principal", "authenticate"]

log = structlog.get_logger(__name__)

# Unknown keys are remembered only briefly, so a key created a moment after a failed try works soon.
_NEGATIVE_TTL_S = 1.0
_MAX_ENTRIES = 10_000

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller behind an API key."""

    key_id: str
    name: str
    scopes: frozenset[Scope]

    @property
    def default_source(self) -> str:
        """The CloudEvents source of events this key sends without one."""
        return f"urn:hookgate:key:{self.key_id}"

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes


class _Expiring(Generic[V]):
    """A dict whose entries expire, bounded: when full, expired entries go first, then the oldest."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: dict[str, tuple[V, float]] = {}

    def get(self, key: str, now: float) -> tuple[V] | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return (entry[0],)

    def put(self, key: str, value: V, expires_at: float, now: float) -> None:
        if key not in self._entries and len(self._entries) >= self._max_entries:
            for stale in [k for k, (_, until) in self._entries.items() if until <= now]:
                del self._entries[stale]
            if len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # dicts keep insertion order
        self._entries[key] = (value, expires_at)

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)


class KeyCache:
    """Principals by key hash for ``ttl_s``: a hit is one SHA-256 and a dict lookup.

    A miss looks the key up in a worker thread; concurrent misses for one key share that lookup.
    Known and unknown keys are kept apart and each bounded, so a flood of bad keys cannot push
    the good ones out. A revoked key keeps working until its entry expires.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        ttl_s: float,
        negative_ttl_s: float = _NEGATIVE_TTL_S,
        max_entries: int = _MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._negative_ttl_s = min(negative_ttl_s, ttl_s)
        self._clock = clock
        self._known: _Expiring[Principal] = _Expiring(max_entries)
        self._unknown: _Expiring[None] = _Expiring(max_entries)
        self._pending: dict[str, asyncio.Task[Principal | None]] = {}

    async def principal(self, plaintext: str) -> Principal | None:
        """The principal for this key, or None when it is unknown or revoked."""
        digest = hashlib.sha256(plaintext.encode()).hexdigest()
        now = self._clock()
        hit = self._known.get(digest, now)
        if hit is not None:
            return hit[0]
        if self._unknown.get(digest, now) is not None:
            return None
        lookup = self._pending.get(digest)
        if lookup is None:
            lookup = asyncio.create_task(self._lookup(digest, plaintext))
            self._pending[digest] = lookup
        # Shielded: a caller that goes away does not cancel the lookup the others wait for.
        return await asyncio.shield(lookup)

    async def _lookup(self, digest: str, plaintext: str) -> Principal | None:
        try:
            record = await asyncio.to_thread(lookup_api_key, self._sessions, plaintext)
        finally:
            del self._pending[digest]
        now = self._clock()
        if record is None:
            self._unknown.put(digest, None, now + self._negative_ttl_s, now)
            return None
        principal = Principal(key_id=record.id, name=record.name, scopes=record.scopes)
        self._unknown.discard(digest)
        self._known.put(digest, principal, now + self._ttl_s, now)
        return principal


def _unauthorized(detail: str, *, invalid_token: bool) -> Problem:
    challenge = 'Bearer realm="hookgate", error="invalid_token"' if invalid_token else 'Bearer realm="hookgate"'
    return Problem(401, detail, headers={"WWW-Authenticate": challenge})


async def authenticate(request: Request, scope: Scope) -> Principal:
    """The caller of ``request`` if its bearer key is active and grants ``scope``; else a 401 or 403 problem."""
    header = request.headers.get("authorization")
    if header is None:
        raise _unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'", invalid_token=False)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("the Authorization header must be 'Bearer <key>'", invalid_token=True)
    keys: KeyCache = request.app.state.keys
    principal = await keys.principal(token)
    if principal is None:
        raise _unauthorized("the API key is unknown or revoked", invalid_token=True)
    if not principal.allows(scope):
        log.info("scope_denied", key_id=principal.key_id, scope=scope.value, path=request.url.path)
        raise Problem(403, f"this API key does not have the '{scope.value}' scope")
    structlog.contextvars.bind_contextvars(key_id=principal.key_id)
    return principal
