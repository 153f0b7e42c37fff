"""Beat's last runs in the store, shared by every beat process: whichever holds the lock carries on from them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.errors import translate_errors
from consumers.store.models import BeatRun

__all__ = ["last_runs", "record_run"]


def last_runs(sessions: sessionmaker[Session]) -> dict[str, datetime]:
    """Every entry's last run as the store knows it."""
    with translate_errors("reading beat's last runs"), sessions() as session:
        return {row.name: row.last_run_at for row in session.execute(select(BeatRun.name, BeatRun.last_run_at))}


def record_run(sessions: sessionmaker[Session], name: str, at: datetime) -> None:
    """Remember that entry ``name`` was sent at ``at`` (never moving a later run back)."""
    with translate_errors("recording a beat run"), sessions.begin() as session:
        moved = session.execute(
            update(BeatRun).where(BeatRun.name == name, BeatRun.last_run_at < at).values(last_run_at=at)
        ).rowcount
        if not moved and session.get(BeatRun, name) is None:
            session.add(BeatRun(name=name, last_run_at=at))
