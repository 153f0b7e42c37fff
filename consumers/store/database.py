"""Engines and sessions for the store: SQLite (WAL, safe across processes) or PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["make_engine", "make_sessionmaker", "migrate", "normalise_url", "utcnow"]

_MIGRATIONS = Path(__file__).with_name("migrations")


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

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers run beside one writer; NORMAL sync is durable across process crashes
            # (the OS still has the WAL), which is the failure the store must survive.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, below

        # A deferred transaction that reads and then writes fails at once (SQLITE_BUSY_SNAPSHOT)
        # when another process wrote in between; taking the write lock at BEGIN makes writers
        # queue on busy_timeout instead. Read-only sessions keep a plain BEGIN.
        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            readonly = conn.get_execution_options().get("readonly", False)
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


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
