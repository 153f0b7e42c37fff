"""Shared fixtures: a fresh RabbitMQ vhost per test module, and both stores, migrated; the log scan plugin."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from consumers.store.database import migrate
from schemas.settings import Settings
from tests.vhosts import fresh_vhost

# tests/logscan.py: every key and secret the run creates is looked for in the run's logs at the end.
# pytester: tests/security/test_security_log_scan.py runs an inner pytest to show the scan failing a run.
pytest_plugins = ["tests.logscan", "pytester"]

PG_ADMIN_URL = os.environ.get("HOOKGATE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    """A vhost for the test module."""
    with fresh_vhost() as url:
        yield url


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of its own for this test run, dropped at the end."""
    name = f"hookgate_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc} (run scripts/setup.sh)")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _reset_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")


def _fresh_store(request: pytest.FixtureRequest, directory: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{directory / 'hookgate.db'}"
    else:
        url = request.getfixturevalue("pg_database")
        _reset_postgres(url)
    migrate(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A freshly migrated store: a SQLite file, then the run's PostgreSQL database emptied."""
    return _fresh_store(request, tmp_path)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``store_url`` shared by a module's tests, for modules that start a worker on it (a start is seconds)."""
    return _fresh_store(request, tmp_path_factory.mktemp("store"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A freshly migrated SQLite store, for tests where the engine does not matter."""
    url = f"sqlite:///{tmp_path / 'hookgate.db'}"
    migrate(url)
    return url


@pytest.fixture
def make_settings(broker_url: str) -> Callable[..., Settings]:
    """Settings for this module's vhost; loopback receivers are allowed, as in local runs."""

    def factory(**overrides: object) -> Settings:
        values: dict[str, object] = {"broker_url": broker_url, "allow_private_targets": True}
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return factory
