"""Retention: what is older than the retention period leaves the store, a short transaction at a time.

An event goes with its deliveries and their attempts (and with it its dedup key, the (source, id)
row) once it was received before the cutoff and none of its deliveries is open or was touched since
the cutoff; an event with an open delivery stays whole. Celery's result rows in the store's database
go once done before the cutoff, and finished heavy jobs created before it with their files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from celery.backends.database.models import Task as TaskResult
from celery.backends.database.models import TaskSet as GroupResult
from sqlalchemy import Connection, Table, delete, exists, inspect, or_, select
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.errors import translate_errors
from consumers.store.jobs import delete_jobs_before
from consumers.store.models import Attempt, Delivery, Event
from schemas.deliveries import OPEN_STATUSES

__all__ = ["Removed", "remove_expired"]

_OPEN = [status.value for status in OPEN_STATUSES]
# Between two batches: SQLite's waiting writers retry on a timer, so a writer that took the lock again
# at once could keep them out; a pause lets the router's and the workers' transactions in.
_PAUSE_S = 0.02


@dataclass
class Removed:
    """Rows removed so far, per kind; ``done`` once nothing past the cutoff is left."""

    events: int = 0
    deliveries: int = 0
    attempts: int = 0
    task_results: int = 0
    jobs: int = 0
    done: bool = False
    batches: int = field(default=0, repr=False)

    def as_dict(self) -> dict[str, int | bool]:
        return {"events": self.events, "deliveries": self.deliveries, "attempts": self.attempts,
                "task_results": self.task_results, "jobs": self.jobs, "done": self.done}


def _kept(cutoff: datetime) -> object:
    """A delivery that keeps its event: still open, or touched since the cutoff."""
    return or_(Delivery.status.in_(_OPEN), Delivery.updated_at >= cutoff)


def _events_batch(session: Session, cutoff: datetime, batch_size: int, removed: Removed) -> bool:
    """Remove one batch of expired events with everything under them; False when there was none."""
    pks = list(session.execute(
        select(Event.pk)
        .where(Event.received_at < cutoff,
               ~exists().where(Delivery.event_pk == Event.pk, _kept(cutoff)))
        .order_by(Event.received_at)
        .limit(batch_size)
    ).scalars())
    if not pks:
        return False
    # Lock the deliveries and look again: on PostgreSQL a retry may have reopened one since the read.
    deliveries = session.execute(
        select(Delivery.id, Delivery.event_pk, _kept(cutoff).label("kept"))
        .where(Delivery.event_pk.in_(pks)).with_for_update()
    ).all()
    keep = {row.event_pk for row in deliveries if row.kept}
    pks = [pk for pk in pks if pk not in keep]
    ids = [row.id for row in deliveries if row.event_pk not in keep]
    if ids:
        removed.attempts += session.execute(delete(Attempt).where(Attempt.delivery_id.in_(ids))).rowcount
        removed.deliveries += session.execute(delete(Delivery).where(Delivery.id.in_(ids))).rowcount
    if pks:
        # Only events left without deliveries: the foreign key would cascade to any that appeared.
        removed.events += session.execute(
            delete(Event).where(Event.pk.in_(pks), ~exists().where(Delivery.event_pk == Event.pk))
        ).rowcount
    return True


def _results_batch(session: Session, table: Table, cutoff: datetime, batch_size: int, removed: Removed) -> bool:
    # Celery writes date_done as a naive UTC datetime.
    naive = cutoff.astimezone(UTC).replace(tzinfo=None)
    ids = list(session.execute(
        select(table.c.id).where(table.c.date_done < naive).order_by(table.c.date_done).limit(batch_size)
    ).scalars())
    if ids:
        removed.task_results += session.execute(delete(table).where(table.c.id.in_(ids))).rowcount
    return bool(ids)


def _result_tables(connection: Connection) -> list[Table]:
    """Celery creates its tables on first use: those that exist yet."""
    names = set(inspect(connection).get_table_names())
    return [table for table in (TaskResult.__table__, GroupResult.__table__) if table.name in names]


def remove_expired(sessions: sessionmaker[Session], cutoff: datetime, *, batch_size: int,
                   task_results: bool, files_root: Path | None = None, deadline: float | None = None,
                   pause: Callable[[float], None] = time.sleep) -> Removed:
    """Remove everything past ``cutoff``, ``batch_size`` events (or result rows, or jobs) per transaction.

    ``task_results``: the Celery result backend is the store's database, so its rows go too.
    ``files_root``: where job files live (``HOOKGATE_FILES_DIR``); finished jobs go with them. Stops
    early, with ``done`` False, once ``time.monotonic()`` passes ``deadline``: the caller carries on
    in a new task. Safe to run twice at once or to interrupt anywhere: every batch is a transaction
    that re-checks what it deletes.
    """
    removed = Removed()
    with translate_errors("reading the store's tables"), sessions() as session:
        tables = _result_tables(session.connection()) if task_results else []
    steps: list[Callable[[Session], bool]] = [
        lambda session: _events_batch(session, cutoff, batch_size, removed),
        *(lambda session, t=table: _results_batch(session, t, cutoff, batch_size, removed) for table in tables),
    ]
    for step in steps:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                return removed
            with translate_errors("removing expired data"), sessions.begin() as session:
                more = step(session)
            removed.batches += 1
            if not more:
                break
            pause(_PAUSE_S)
    if files_root is not None:
        if deadline is not None and time.monotonic() > deadline:
            return removed
        # Jobs are few beside events: all of them now, still a batch per transaction.
        removed.jobs = delete_jobs_before(sessions, files_root, cutoff, batch_size)
    removed.done = True
    return removed
