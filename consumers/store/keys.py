"""API keys: created once, shown once, stored only as a SHA-256 hash, revoked by time stamp."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import utcnow
from consumers.store.errors import translate_errors
from consumers.store.models import ApiKey
from schemas.ids import new_id
from schemas.keys import Scope

__all__ = ["KEY_PREFIX", "KeyRecord", "create_api_key", "hash_key", "lookup_api_key", "revoke_api_key"]

KEY_PREFIX = "hg_"
# 32 random bytes are 43 characters of unpadded urlsafe base64.
_KEY_LENGTH = len(KEY_PREFIX) + 43
_DISPLAY_PREFIX_LENGTH = 12


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An active API key as the gateway needs it: who it is and what it may do."""

    id: str
    name: str
    prefix: str
    scopes: frozenset[Scope]
    created_at: datetime


def hash_key(plaintext: str) -> str:
    """The stored form of a key: keys are 256-bit random, so one fast hash cannot be brute-forced."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_api_key(sessions: sessionmaker[Session], name: str, scopes: Sequence[Scope]) -> tuple[str, str]:
    """Store a new key and return ``(key_id, plaintext)``; the plaintext is not kept anywhere."""
    name = name.strip()
    if not name or len(name) > 200:
        raise ValueError("a key name is 1 to 200 characters")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = new_id()
    row = ApiKey(
        id=key_id,
        name=name,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:_DISPLAY_PREFIX_LENGTH],
        scopes=sorted({Scope(s).value for s in scopes}),
        created_at=utcnow(),
        revoked_at=None,
    )
    with translate_errors("creating an API key"), sessions.begin() as session:
        session.add(row)
    return key_id, plaintext


def lookup_api_key(sessions: sessionmaker[Session], plaintext: str) -> KeyRecord | None:
    """The active key with this plaintext, or None when it is unknown or revoked."""
    if len(plaintext) != _KEY_LENGTH or not plaintext.startswith(KEY_PREFIX):
        return None
    with translate_errors("looking up an API key"), sessions() as session:
        row = session.execute(
            select(ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.scopes, ApiKey.created_at).where(
                ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None)
            )
        ).one_or_none()
    if row is None:
        return None
    # A scope this version does not know (written by a newer one) grants nothing here.
    known = frozenset(s for s in Scope if s.value in row.scopes)
    return KeyRecord(id=row.id, name=row.name, prefix=row.prefix, scopes=known, created_at=row.created_at)


def revoke_api_key(sessions: sessionmaker[Session], key_id: str) -> bool:
    """Revoke the key; True if it was active. Gateways notice within their key-cache TTL."""
    with translate_errors("revoking an API key"), sessions.begin() as session:
        result = session.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        )
    return result.rowcount == 1
