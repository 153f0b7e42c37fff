"""Alembic environment: runs the migrations against the URL that ``migrate()`` passes in."""

from __future__ import annotations

from alembic import context

from consumers.store.database import make_engine
from consumers.store.models import Base

config = context.config
engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
