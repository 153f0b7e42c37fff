"""Engines and sessions for the store: SQLite (WAL, safe across processes) or PostgreSQL."""

from __future__ import annotations

import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["make_engine", "make_sessionmaker", "migrate", "normalise_url", "utcnow"]

_MIGRATIONS = Path(__file__).with_name("migrations")
# Where a SQLite connection keeps the descriptor of its write-lock file (its pool record's info).
_WRITE_LOCK = "hookgate_write_lock"


def utcnow() -> datetime:
    return datetime.now(UTC)


def normalise_url(url: str) -> str:
    # psycopg 3 is the PostgreSQL driver we ship; accept the bare scheme users write.
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare):]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        lock_path = _write_lock_path(engine)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, record: Any) -> None:
            # WAL lets readers run beside one writer; NORMAL sync is durable across process crashes
            # (the OS still has the WAL), which is the failure the store must survive.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            dbapi_conn.isolation_level = None  # we emit BEGIN and COMMIT ourselves, below
            if lock_path is not None:
                record.info[_WRITE_LOCK] = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)

        @event.listens_for(engine, "close")
        def _sqlite_close(_dbapi_conn: Any, record: Any) -> None:
            if (fd := record.info.pop(_WRITE_LOCK, None)) is not None:
                os.close(fd)

        # A connection handed back to the pool in a transaction (its Connection was never closed)
        # is rolled back by the pool itself, past the events below: it must let go of the lock too.
        @event.listens_for(engine, "reset")
        def _sqlite_reset(_dbapi_conn: Any, record: Any, _state: Any) -> None:
            if (fd := record.info.get(_WRITE_LOCK)) is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

        # A deferred transaction that reads and then writes fails at once (SQLITE_BUSY_SNAPSHOT)
        # when another process wrote in between; taking the write lock at BEGIN makes writers
        # queue instead. Read-only sessions keep a plain BEGIN and take no lock.
        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            if conn.get_execution_options().get("readonly", False):
                conn.exec_driver_sql("BEGIN")
                return
            _lock(conn)
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                _unlock(conn)
                raise

        # COMMIT and ROLLBACK are issued here, so that the write lock is let go only once they are
        # done; the driver's own commit() and rollback() then find no transaction and do nothing.
        @event.listens_for(engine, "commit")
        def _sqlite_commit(conn: Any) -> None:
            try:
                conn.exec_driver_sql("COMMIT")
            finally:
                _unlock(conn)

        @event.listens_for(engine, "rollback")
        def _sqlite_rollback(conn: Any) -> None:
            try:
                if conn.connection.dbapi_connection.in_transaction:
                    conn.exec_driver_sql("ROLLBACK")
            finally:
                _unlock(conn)

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _write_lock_path(engine: Engine) -> str | None:
    """The lock file beside a SQLite database file; None for an in-memory database (one process)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return f"{database}.write-lock"


def _lock(conn: Any) -> None:
    """Queue for the right to write, in the kernel, across every process and thread on the database.

    SQLite's own busy handler polls: a writer that finds the database locked sleeps 1, 2, 5, ...
    up to 100 ms between tries, so under load the lock sits free while the waiters sleep (measured
    with four webhook workers: over half the BEGINs waited more than 5 ms, 55 ms on average). A
    waiter on ``flock`` is woken the moment the holder lets go. The kernel drops the lock of a
    process that dies. A thread must not open a second write transaction while it holds one: that
    waits for itself (SQLite alone would fail it after ``busy_timeout``).
    """
    if (fd := conn.connection.info.get(_WRITE_LOCK)) is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _unlock(conn: Any) -> None:
    if (fd := conn.connection.info.get(_WRITE_LOCK)) is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def make_sessionmaker(engine: Engine, *, readonly: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``; ``readonly`` ones never take SQLite's write lock."""
    bind = engine.execution_options(readonly=True) if readonly else engine
    return sessionmaker(bind, expire_on_commit=False)


def migrate(url: str) -> None:
    """Create or upgrade the schema to the newest migration."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    command.upgrade(cfg, "head")
