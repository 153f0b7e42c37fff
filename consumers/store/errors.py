"""The store's errors: SQLAlchemy failures translated at the module that called the database.

Errors::

    StoreError    the database failed or is unreachable; the operation may be retried later
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import SQLAlchemyError

__all__ = ["StoreError", "translate_errors"]


class StoreError(Exception):
    """The store could not do what was asked; the message names the operation, never the data."""


@contextmanager
def translate_errors(operation: str) -> Iterator[None]:
    """Turn any SQLAlchemy error raised inside into ``StoreError``."""
    try:
        yield
    except SQLAlchemyError as exc:
        # The message of a DBAPI error can quote statement parameters (key hashes, secrets): name the class only.
        raise StoreError(f"{operation} failed: {type(exc).__name__}") from exc
