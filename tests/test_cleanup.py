"""Retention cleanup: exactly what is past retention leaves the store, in batches that let ingest in."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery.backends.database.models import ResultModelBase, TaskExtended, TaskSet
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store import jobs
from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.ingest import ActiveSubscription, persist_events
from consumers.store.jobs import JobFiles
from consumers.store.models import Attempt, Delivery, Event, Job
from consumers.store.retention import remove_expired
from schemas.deliveries import DeliveryStatus
from schemas.events import CloudEvent
from schemas.ids import new_id
from schemas.jobs import FileFormat, JobKind, JobStatus
from tests.history import add_event, add_past_delivery
from tests.receiver import make_secret
from tests.seeding import add_subscription

DAY = timedelta(days=1)


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


def _count(sessions: sessionmaker[Session], model: type) -> int:
    with sessions() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def _pks(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(session.execute(select(Event.pk)).scalars())


def _add_results(engine: Engine, done: list[datetime]) -> None:
    """Celery result rows (tasks and groups) as its database backend writes them: naive UTC date_done."""
    ResultModelBase.metadata.create_all(engine)
    with engine.begin() as conn:
        for moment in done:
            naive = moment.astimezone(UTC).replace(tzinfo=None)
            conn.execute(insert(TaskExtended.__table__).values(task_id=new_id(), status="SUCCESS", date_done=naive))
            conn.execute(insert(TaskSet.__table__).values(taskset_id=new_id(), date_done=naive))


def test_cleanup_removes_exactly_what_is_past_retention(engine: Engine, sessions: sessionmaker[Session],
                                                        tmp_path: Path) -> None:
    """Events past the cutoff go with their deliveries, attempts, dedup keys, old task results and old finished
    jobs with their files; an event with an open delivery or one touched since the cutoff stays whole, and so
    does everything younger."""
    now = utcnow()
    cutoff = now - 30 * DAY
    old, just_inside = now - 40 * DAY, cutoff + timedelta(minutes=1)
    subscription_id = add_subscription(sessions, "https://example.com/hook", make_secret())

    def event_with(*deliveries: tuple[DeliveryStatus, datetime], received_at: datetime = old) -> str:
        pk = add_event(sessions, received_at)
        for status, updated_at in deliveries:
            add_past_delivery(sessions, pk, subscription_id, status, updated_at,
                              attempts=[(updated_at, 12.0, 500), (updated_at, 8.0, 200)])
            subscription = add_subscription(sessions, "https://example.com/other", make_secret())
            add_past_delivery(sessions, pk, subscription, DeliveryStatus.DEAD, updated_at,
                              attempts=[(updated_at, 5.0, 410)])
        return pk

    expired = {event_with((DeliveryStatus.SUCCEEDED, old + DAY)) for _ in range(5)}
    expired.add(event_with())  # no subscription matched it
    kept = {
        event_with((DeliveryStatus.RETRYING, old + DAY)),  # an open delivery
        event_with((DeliveryStatus.PENDING, old)),
        event_with((DeliveryStatus.SUCCEEDED, now - DAY)),  # re-sent yesterday
        event_with((DeliveryStatus.SUCCEEDED, now - 29 * DAY), received_at=now - 29 * DAY),
        event_with((DeliveryStatus.SUCCEEDED, just_inside), received_at=just_inside),
    }
    _add_results(engine, [old, old, now - DAY])
    with sessions() as session:
        old_key = session.execute(select(Event.source, Event.id).where(Event.pk == sorted(expired)[0])).one()

    old_job, recent_job = _add_job(sessions, tmp_path, old), _add_job(sessions, tmp_path, now - DAY)

    removed = remove_expired(sessions, cutoff, batch_size=2, task_results=True, files_root=tmp_path)

    assert removed.as_dict() == {"events": 6, "deliveries": 10, "attempts": 15, "task_results": 4, "jobs": 1,
                                 "done": True}
    with sessions() as session:
        assert list(session.execute(select(Job.id)).scalars()) == [recent_job]
    assert not JobFiles(tmp_path, old_job).directory.exists() and JobFiles(tmp_path, recent_job).input.exists()
    assert _pks(sessions) == kept
    assert _count(sessions, Delivery) == 2 * len(kept)
    assert _count(sessions, Attempt) == 3 * len(kept)
    assert _count(sessions, TaskExtended) == 1 and _count(sessions, TaskSet) == 1
    # The dedup key went with the event: the same (source, id) is a new event now.
    event = CloudEvent(id=old_key.id, source=old_key.source, type="order.created", data={})
    _, duplicates = persist_events(sessions, [(event, event.to_json())], [])
    assert duplicates == 0
    assert remove_expired(sessions, cutoff, batch_size=2, task_results=True, files_root=tmp_path).as_dict() == {
        "events": 0, "deliveries": 0, "attempts": 0, "task_results": 0, "jobs": 0, "done": True}


def _add_job(sessions: sessionmaker[Session], files_root: Path, created_at: datetime) -> str:
    """A finished import job created at ``created_at``, with its input file."""
    job_id = new_id()
    jobs.create_job(sessions, job_id=job_id, task_id=new_id(), kind=JobKind.IMPORT, format=FileFormat.NDJSON,
                    bytes_total=3)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id)
                        .values(created_at=created_at, status=JobStatus.SUCCEEDED.value))
    files = JobFiles(files_root, job_id)
    files.directory.mkdir(parents=True)
    files.input.write_bytes(b"{}\n")
    return job_id


def test_cleanup_stops_at_its_deadline_and_a_second_run_finishes(sessions: sessionmaker[Session]) -> None:
    """Past its deadline cleanup stops between batches, not done; run again, it removes the rest."""
    old = utcnow() - 40 * DAY
    for _ in range(4):
        add_event(sessions, old)
    stopped = remove_expired(sessions, utcnow() - 30 * DAY, batch_size=1, task_results=False,
                             deadline=time.monotonic() + 3600, pause=lambda _s: None)
    assert stopped.done and stopped.events == 4
    for _ in range(4):
        add_event(sessions, old)
    first = remove_expired(sessions, utcnow() - 30 * DAY, batch_size=1, task_results=False,
                           deadline=time.monotonic() - 1)
    assert (first.events, first.done) == (0, False)
    rest = remove_expired(sessions, utcnow() - 30 * DAY, batch_size=3, task_results=False)
    assert (rest.events, rest.done) == (4, True)


def test_ingest_keeps_committing_on_sqlite_while_cleanup_runs(sqlite_url: str, tmp_path: Path) -> None:
    """On SQLite, the router's transactions keep committing while a large cleanup runs, batch after batch."""
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    router_engine = make_engine(sqlite_url)
    router_sessions = make_sessionmaker(router_engine)
    try:
        subscription_id = add_subscription(sessions, "https://example.com/hook", make_secret())
        old = utcnow() - 40 * DAY
        events = [{"pk": new_id(), "id": new_id(), "source": "tests/old", "type": "order.created",
                   "body": "{}", "received_at": old} for _ in range(6000)]
        deliveries = [{"id": new_id(), "event_pk": e["pk"], "subscription_id": subscription_id,
                       "status": "succeeded", "attempts_count": 1, "attempts_base": 0, "created_at": old,
                       "updated_at": old} for e in events]
        with sessions.begin() as session:
            session.execute(insert(Event), events)
            session.execute(insert(Delivery), deliveries)
            session.execute(insert(Attempt), [{"delivery_id": d["id"], "number": 1, "started_at": old,
                                               "duration_ms": 5.0, "status_code": 200} for d in deliveries])
        result: dict[str, object] = {}

        def clean() -> None:
            result["started"] = time.monotonic()
            result["removed"] = remove_expired(sessions, utcnow() - 30 * DAY, batch_size=100, task_results=False)
            result["ended"] = time.monotonic()

        cleaner = threading.Thread(target=clean)
        subscription = ActiveSubscription(subscription_id, "webhook", ("order.*",), {})
        commits: list[float] = []
        cleaner.start()
        while cleaner.is_alive():
            batch = [CloudEvent(id=new_id(), source="tests/new", type="order.created", data={}) for _ in range(10)]
            persist_events(router_sessions, [(event, event.to_json()) for event in batch], [subscription])
            commits.append(time.monotonic())
        cleaner.join()
        removed = result["removed"]
        assert removed.done and removed.events == 6000  # type: ignore[attr-defined]
        started, ended = float(result["started"]), float(result["ended"])  # type: ignore[arg-type]
        # Interleaved throughout, not queued behind one long transaction: commits in every quarter of the run.
        quarters = [sum(1 for t in commits if started + q * (ended - started) / 4 < t < started + (q + 1) *
                        (ended - started) / 4) for q in range(4)]
        assert all(quarters), (quarters, removed)
        assert _count(sessions, Event) == 10 * len(commits)
    finally:
        engine.dispose()
        router_engine.dispose()
