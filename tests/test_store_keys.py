"""API keys in the store: shape, hashing, lookup, revocation, and errors, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.errors import StoreError
from consumers.store.keys import create_api_key, hash_key, lookup_api_key, revoke_api_key
from consumers.store.models import ApiKey
from schemas.keys import Scope


@pytest.fixture
def sessions(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(store_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_a_new_key_is_hg_and_43_urlsafe_characters(sessions: sessionmaker[Session]) -> None:
    """A created key is `hg_` followed by 43 urlsafe base64 characters (32 random bytes)."""
    key_id, plaintext = create_api_key(sessions, "ci", [Scope.EVENTS_WRITE])
    assert re.fullmatch(r"hg_[A-Za-z0-9_-]{43}", plaintext)
    assert key_id != plaintext
    assert create_api_key(sessions, "ci", [Scope.EVENTS_WRITE])[1] != plaintext


def test_only_the_hash_and_a_display_prefix_are_stored(sessions: sessionmaker[Session]) -> None:
    """The row holds the SHA-256 of the key and its first 12 characters, never the key itself."""
    key_id, plaintext = create_api_key(sessions, "ci", [Scope.ADMIN])
    with sessions() as session:
        row = session.execute(select(ApiKey).where(ApiKey.id == key_id)).scalar_one()
    assert row.key_hash == hashlib.sha256(plaintext.encode()).hexdigest() == hash_key(plaintext)
    assert row.prefix == plaintext[:12]
    stored = [str(getattr(row, column.key)) for column in ApiKey.__table__.columns]
    assert not any(plaintext in value for value in stored)


def test_lookup_returns_the_key_with_its_scopes(sessions: sessionmaker[Session]) -> None:
    """Looking up a key by its plaintext gives its id, name and scopes, duplicates folded."""
    key_id, plaintext = create_api_key(sessions, "ingest", [Scope.EVENTS_WRITE, Scope.EVENTS_READ, Scope.EVENTS_WRITE])
    record = lookup_api_key(sessions, plaintext)
    assert record is not None
    assert (record.id, record.name, record.prefix) == (key_id, "ingest", plaintext[:12])
    assert record.scopes == {Scope.EVENTS_WRITE, Scope.EVENTS_READ}


def test_unknown_and_malformed_keys_are_not_found(sessions: sessionmaker[Session]) -> None:
    """A well-formed key that was never issued, and strings that are not keys at all, find nothing."""
    _, plaintext = create_api_key(sessions, "ci", [Scope.ADMIN])
    never_issued = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    for candidate in (never_issued, "", "hg_", plaintext + "x", "Bearer " + plaintext):
        assert lookup_api_key(sessions, candidate) is None


def test_a_revoked_key_is_not_found_and_revoking_twice_says_so(sessions: sessionmaker[Session]) -> None:
    """Revoking makes lookups fail; a second revoke, or one of an unknown id, reports False."""
    key_id, plaintext = create_api_key(sessions, "ci", [Scope.ADMIN])
    assert revoke_api_key(sessions, key_id) is True
    assert lookup_api_key(sessions, plaintext) is None
    assert revoke_api_key(sessions, key_id) is False
    assert revoke_api_key(sessions, "no-such-key") is False


def test_a_blank_name_is_refused(sessions: sessionmaker[Session]) -> None:
    """Keys need a name of 1 to 200 characters."""
    with pytest.raises(ValueError, match="name"):
        create_api_key(sessions, "   ", [Scope.ADMIN])


def test_database_errors_become_store_errors_without_the_key(tmp_path: Path) -> None:
    """A failing store raises StoreError, whose message carries neither the key nor its hash."""
    engine = make_engine(f"sqlite:///{tmp_path / 'not-migrated.db'}")
    try:
        plaintext = "hg_" + "a" * 43
        with pytest.raises(StoreError) as caught:
            lookup_api_key(make_sessionmaker(engine), plaintext)
    finally:
        engine.dispose()
    assert plaintext not in str(caught.value)
    assert hash_key(plaintext) not in str(caught.value)
