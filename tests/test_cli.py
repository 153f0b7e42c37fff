"""The `hookgate` command line, run as real processes: keys, migrate, settings errors and the log format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import inspect, select

from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.keys import lookup_api_key
from consumers.store.models import ApiKey, Base
from schemas.keys import Scope

HOOKGATE = str(Path(sys.executable).with_name("hookgate"))


def environment(**settings: str) -> dict[str, str]:
    """This environment with only the given HOOKGATE_* settings, logging JSON lines."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOOKGATE_") or k.startswith("HOOKGATE_TEST_")}
    return {**clean, "HOOKGATE_LOG_FORMAT": "json", **settings}


def run(*args: str, cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `hookgate` script to completion."""
    return subprocess.run([HOOKGATE, *args], cwd=cwd, env=environment(**settings), capture_output=True, text=True,
                          timeout=60)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def stored_key_rows(url: str) -> list[dict[str, object]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(select(ApiKey))]
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store with no schema yet: a new SQLite file, then the run's PostgreSQL database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    url: str = request.getfixturevalue("pg_database")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return url


@pytest.fixture
def created_key(store_url: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.CompletedProcess[str]]]:
    """`hookgate keys create` run once against a migrated store, with two scopes."""
    result = run("keys", "create", "billing service", "--scope", "admin", "--scope", "events:write",
                 cwd=tmp_path, HOOKGATE_DATABASE_URL=store_url)
    assert result.returncode == 0, result.stderr
    yield store_url, result


def test_keys_create_prints_the_key_alone_on_the_last_line(created_key: tuple[str, subprocess.CompletedProcess[str]]
                                                           ) -> None:
    """The new key is the whole last line of stdout, shown nowhere else, and it authenticates with its scopes."""
    url, result = created_key
    lines = result.stdout.splitlines()
    key = lines[-1]
    assert key == key.strip() and " " not in key and len(key) >= 40
    assert all(key not in line for line in lines[:-1])
    assert key not in result.stderr
    engine = make_engine(url)
    try:
        record = lookup_api_key(make_sessionmaker(engine, readonly=True), key)
    finally:
        engine.dispose()
    assert record is not None
    assert record.name == "billing service"
    assert record.scopes == {Scope.ADMIN, Scope.EVENTS_WRITE}
    assert record.id in result.stdout


def test_keys_are_stored_hashed(created_key: tuple[str, subprocess.CompletedProcess[str]]) -> None:
    """No column of the stored key holds the plaintext or any long piece of it."""
    url, result = created_key
    key = result.stdout.splitlines()[-1]
    (row,) = stored_key_rows(url)
    for value in row.values():
        assert key[-20:] not in str(value)


def test_keys_create_defaults_to_the_events_write_scope(sqlite_url: str, tmp_path: Path) -> None:
    """Without --scope the key may only send events."""
    result = run("keys", "create", "sender", cwd=tmp_path, HOOKGATE_DATABASE_URL=sqlite_url)
    assert result.returncode == 0, result.stderr
    engine = make_engine(sqlite_url)
    try:
        record = lookup_api_key(make_sessionmaker(engine), result.stdout.splitlines()[-1])
    finally:
        engine.dispose()
    assert record is not None and record.scopes == {Scope.EVENTS_WRITE}


def test_keys_create_rejects_an_unknown_scope(sqlite_url: str, tmp_path: Path) -> None:
    """An unknown scope is a usage error and stores nothing."""
    result = run("keys", "create", "sender", "--scope", "root", cwd=tmp_path, HOOKGATE_DATABASE_URL=sqlite_url)
    assert result.returncode == 2
    assert "root" in result.stderr
    assert stored_key_rows(sqlite_url) == []


def test_keys_create_on_an_unmigrated_store_says_to_migrate(tmp_path: Path) -> None:
    """Against a store without a schema the command fails with advice, not a traceback."""
    result = run("keys", "create", "sender", cwd=tmp_path, HOOKGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'new.db'}")
    assert result.returncode == 1
    assert "hookgate migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_creates_the_schema_and_can_run_again(empty_store_url: str, tmp_path: Path) -> None:
    """`hookgate migrate` creates every table of the models, and a second run changes nothing and succeeds."""
    for _ in range(2):
        result = run("migrate", cwd=tmp_path, HOOKGATE_DATABASE_URL=empty_store_url)
        assert result.returncode == 0, result.stderr
    engine = make_engine(empty_store_url)
    try:
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            assert {c["name"] for c in inspector.get_columns(table.name)} == {c.name for c in table.columns}
    finally:
        engine.dispose()


def test_migrate_explains_an_unreachable_database(tmp_path: Path) -> None:
    """A database that refuses connections gives a one-line error naming it, without its password."""
    url = "postgresql://hookgate:hunter2-secret@127.0.0.1:1/hookgate"
    result = run("migrate", cwd=tmp_path, HOOKGATE_DATABASE_URL=url)
    assert result.returncode == 1
    assert "could not migrate the store at postgresql" in result.stderr
    assert "hunter2-secret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_settings_name_the_variable_but_not_the_value(tmp_path: Path) -> None:
    """A malformed HOOKGATE_* variable is a usage error naming the variable, never echoing its value."""
    result = run("migrate", cwd=tmp_path, HOOKGATE_PORT="s3cret-not-a-port")
    assert result.returncode == 2
    assert "HOOKGATE_PORT" in result.stderr
    assert "s3cret-not-a-port" not in result.stderr


def test_every_log_line_is_json_with_process_and_pid(tmp_path: Path) -> None:
    """With JSON logs, every stderr line, the libraries' too (Alembic), is a JSON object naming the process."""
    with subprocess.Popen([HOOKGATE, "migrate"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                          env=environment(HOOKGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'log.db'}")) as process:
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    lines = json_lines(stderr)
    assert {line["logger"] for line in lines} >= {"gateway.cli", "alembic.runtime.migration"}
    assert all(line["process"] == "migrate" and line["pid"] == process.pid for line in lines)
    assert all({"timestamp", "level", "event"} <= line.keys() for line in lines)


def test_console_logs_when_asked(tmp_path: Path) -> None:
    """HOOKGATE_LOG_FORMAT=console writes human-readable lines instead of JSON."""
    result = run("migrate", cwd=tmp_path, HOOKGATE_LOG_FORMAT="console",
                 HOOKGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'log.db'}")
    assert result.returncode == 0, result.stderr
    assert "store_migrated" in result.stderr
    assert not result.stderr.lstrip().startswith("{")


def test_context_variables_reach_structlog_and_stdlib_lines() -> None:
    """Ids bound with bind_contextvars appear on structlog lines and on lines of stdlib loggers alike."""
    program = (
        "import logging, structlog\n"
        "from consumers.logs import configure_logging\n"
        "configure_logging('probe', json=True)\n"
        "structlog.contextvars.bind_contextvars(event_id='ev-1', delivery_id='dl-2')\n"
        "structlog.get_logger('probe.structlog').info('from_structlog', attempt=3)\n"
        "logging.getLogger('probe.stdlib').warning('from %s', 'stdlib')\n"
        "logging.getLogger('probe.stdlib').debug('below the level')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    first, second = json_lines(result.stderr)
    assert first["event"] == "from_structlog" and first["attempt"] == 3
    assert second["event"] == "from stdlib" and second["level"] == "warning" and second["logger"] == "probe.stdlib"
    for line in (first, second):
        assert line["event_id"] == "ev-1" and line["delivery_id"] == "dl-2" and line["process"] == "probe"


def test_request_urls_logged_by_httpx_are_kept_out() -> None:
    """httpx's per-request INFO lines, which carry webhook URLs and their tokens, are not written; its warnings are."""
    program = (
        "import logging\n"
        "from consumers.logs import configure_logging\n"
        "configure_logging('probe', level='DEBUG', json=True)\n"
        "logging.getLogger('httpx').info('HTTP Request: POST https://hooks.example/T0KEN \"HTTP/1.1 200 OK\"')\n"
        "logging.getLogger('httpx').warning('pool exhausted')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "T0KEN" not in result.stderr
    assert [line["event"] for line in json_lines(result.stderr)] == ["pool exhausted"]


def test_runs_as_python_module() -> None:
    """`python -m gateway.cli` is the same command line, listing every process command."""
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    for command in ("up", "serve", "router", "worker", "beat", "migrate", "keys"):
        assert f"  {command} " in result.stdout


def test_worker_needs_a_queue(tmp_path: Path) -> None:
    """`hookgate worker` without a queue name is a usage error, before anything connects."""
    result = run("worker", "-Q", " , ", cwd=tmp_path)
    assert result.returncode == 2
    assert "queue" in result.stderr
