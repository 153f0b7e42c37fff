"""The migrations create the schema the models describe, on both engines."""

from __future__ import annotations

from sqlalchemy import inspect

from consumers.store.database import make_engine
from consumers.store.models import Base


def test_migrated_tables_match_the_models(store_url: str) -> None:
    """Every table and column of the models exists after `migrate`."""
    engine = make_engine(store_url)
    try:
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            columns = {c["name"] for c in inspector.get_columns(table.name)}
            assert columns == {c.name for c in table.columns}, table.name
    finally:
        engine.dispose()
