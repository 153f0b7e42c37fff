"""Beat: the schedule built from the settings, and a scheduler that sends only while it holds the beat lock.

The lock is an exclusive queue, ``hookgate.beat``, declared on a connection of the beat's own.
RabbitMQ lets one connection at a time declare it and deletes it the moment that connection closes,
so a beat that dies (SIGKILL included) or loses the broker frees it at once, and another beat's next
attempt takes over. While it waits a beat sends nothing. The last run of every entry is kept in the
store (``beat_runs``), so the next holder neither repeats a run the previous one made nor misses one
that fell due while nobody held the lock.
"""

from __future__ import annotations

import contextlib
import threading
from datetime import timedelta
from typing import Any

import structlog
from amqp.exceptions import ResourceLocked
from celery import Celery
from celery.beat import PersistentScheduler, ScheduleEntry
from celery.schedules import BaseSchedule, crontab, schedule
from celery.utils.time import maybe_make_aware
from kombu import Connection, Queue

from consumers.store.beat_runs import last_runs, record_run
from consumers.store.database import make_engine, make_sessionmaker
from consumers.store.errors import StoreError
from schemas.beat import BeatSchedule, parse_beat_schedule
from schemas.settings import Settings
from schemas.topology import BEAT_LOCK_QUEUE

__all__ = ["LOCK_CONNECTION_NAME", "BeatLock", "LockedScheduler", "beat_schedule"]

logger = structlog.get_logger(__name__)

# A crontab entry's message is worth running for this long after it was sent (a worker down for a
# while still does the night's cleanup); an interval entry's only until the next one.
_CRONTAB_EXPIRES_S = 12 * 3600
_LOCK_HEARTBEAT_S = 10
LOCK_CONNECTION_NAME = "hookgate beat lock"


def _celery_schedule(parsed: BeatSchedule) -> BaseSchedule:
    if parsed.crontab is not None:
        minute, hour, day_of_month, month_of_year, day_of_week = parsed.crontab
        return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                       day_of_week=day_of_week)
    assert parsed.every_s is not None
    return schedule(timedelta(seconds=parsed.every_s))


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule`` for hookgate's entries; an entry whose schedule is empty is left out."""
    entries: dict[str, dict[str, Any]] = {}
    for name, task, text in (
        ("sweep-stuck-deliveries", "tasks.sweep_stuck_deliveries", settings.sweep_schedule),
        ("cleanup-old-data", "tasks.cleanup_old_data", settings.cleanup_schedule),
        ("weekly-report", "tasks.generate_weekly_report", settings.report_schedule),
    ):
        parsed = parse_beat_schedule(text)
        if parsed is not None:
            expires = parsed.every_s if parsed.every_s is not None else _CRONTAB_EXPIRES_S
            entries[name] = {"task": task, "schedule": _celery_schedule(parsed), "options": {"expires": expires}}
    return entries


class BeatLock:
    """The exclusive queue ``hookgate.beat``, held by a connection a daemon thread keeps alive.

    ``acquire`` returns at once: True if this process holds the lock now. ``held`` turns False as soon
    as the thread sees the connection fail (a read error, or the broker's heartbeats missing).
    """

    def __init__(self, broker_url: str, queue: str = BEAT_LOCK_QUEUE, heartbeat_s: float = _LOCK_HEARTBEAT_S) -> None:
        self._url = broker_url
        # Classic, whatever the vhost's default queue type: quorum queues cannot be exclusive.
        self._queue = Queue(queue, exclusive=True, auto_delete=True, durable=False,
                            queue_arguments={"x-queue-type": "classic"})
        self._heartbeat_s = heartbeat_s
        self._connection: Connection | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._connection is not None and not self._lost.is_set()

    def acquire(self) -> bool:
        if self.held:
            return True
        self.release()
        connection = Connection(self._url, heartbeat=self._heartbeat_s, connect_timeout=5,
                                # The name RabbitMQ shows for the connection (rabbitmqctl list_connections).
                                transport_options={"client_properties": {"connection_name": LOCK_CONNECTION_NAME}})
        try:
            connection.connect()
            self._queue(connection.channel()).declare()
        except ResourceLocked:
            self._close(connection)
            return False
        except Exception as exc:  # the broker is away: not ours, try again later
            logger.warning("beat_lock_unavailable", error=str(exc))
            self._close(connection)
            return False
        self._connection = connection
        self._lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep_alive, args=(connection,), name="beat-lock", daemon=True)
        self._thread.start()
        return True

    def _keep_alive(self, connection: Connection) -> None:
        while not self._stop.is_set():
            try:
                # Reading processes the broker's heartbeats and notices a closed connection; then ours go out.
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=self._heartbeat_s / 4)
                connection.heartbeat_check()
            except Exception as exc:
                if not self._stop.is_set():
                    logger.warning("beat_lock_connection_lost", error=str(exc))
                self._lost.set()
                return

    def release(self) -> None:
        """Close the lock's connection (the broker drops the queue), if there is one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._heartbeat_s)
            self._thread = None
        if self._connection is not None:
            self._close(self._connection)
            self._connection = None

    @staticmethod
    def _close(connection: Connection) -> None:
        with contextlib.suppress(Exception):
            connection.release()


class LockedScheduler(PersistentScheduler):
    """Celery's persistent scheduler, sending only while this process holds the ``BeatLock``.

    Every tick first makes sure of the lock: without it, the tick tries to take it and otherwise
    sleeps ``HOOKGATE_BEAT_LOCK_POLL_S``; on taking it, the entries' last runs come from the store.
    The holder ticks at least that often too, so a lost lock stops its sending within that time.
    Each entry sent is recorded in the store.
    """

    def __init__(self, app: Celery, *args: Any, **kwargs: Any) -> None:
        settings: Settings = app.conf.hookgate_settings
        self._poll_s = settings.beat_lock_poll_s
        self._lock = BeatLock(settings.broker_url)
        self._engine = make_engine(settings.database_url)
        self._sessions = make_sessionmaker(self._engine)
        self._results_in_store = not settings.result_backend
        self._holding = False
        self._waiting_logged = False
        super().__init__(app, *args, **kwargs)

    def install_default_entries(self, data: Any) -> None:
        # Celery's own celery.backend_cleanup deletes expired results in one statement; when they live
        # in the store, tasks.cleanup_old_data removes them in batches instead.
        if not self._results_in_store:
            super().install_default_entries(data)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self._lock.held:
            if self._holding:
                logger.warning("beat_lock_lost")
                self._holding = False
            if not self._lock.acquire():
                if not self._waiting_logged:
                    logger.info("beat_lock_waiting", lock=BEAT_LOCK_QUEUE, poll_s=self._poll_s)
                    self._waiting_logged = True
                return self._poll_s
            if not self._take_over():
                return self._poll_s
        return min(float(super().tick(*args, **kwargs)), self._poll_s)

    def _take_over(self) -> bool:
        try:
            runs = last_runs(self._sessions)
        except StoreError as exc:
            # Without the shared record this beat cannot know what the last holder ran: wait and retry.
            logger.warning("beat_last_runs_unavailable", error=str(exc))
            self._lock.release()
            return False
        for name, entry in self.schedule.items():
            stored = runs.get(name)
            if stored is not None and (entry.last_run_at is None or stored > maybe_make_aware(entry.last_run_at)):
                entry.last_run_at = stored
        self._heap = None  # rebuilt from the new last runs on this tick
        self._holding, self._waiting_logged = True, False
        logger.info("beat_lock_acquired", lock=BEAT_LOCK_QUEUE, entries=sorted(self.schedule))
        return True

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        super().apply_entry(entry, producer=producer)
        # ``reserve`` already moved the entry on: its last run is now.
        sent = self.schedule[entry.name].last_run_at
        try:
            record_run(self._sessions, entry.name, sent)
        except StoreError as exc:
            # The local schedule file still has it; only a takeover before the next record would repeat it.
            logger.warning("beat_run_not_recorded", entry=entry.name, error=str(exc))

    def close(self) -> None:
        super().close()
        self._lock.release()
        self._engine.dispose()
