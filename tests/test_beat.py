"""Beat with real processes: entries fire on a schedule in seconds, one beat at a time, another takes over."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from kombu import Connection
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.models import BeatRun, Event
from consumers.topology import declare_topology, task_queue
from schemas import topology
from schemas.deliveries import DeliveryStatus
from schemas.settings import Settings
from tests.beats import drain_task_messages, running_beat
from tests.history import add_event, add_past_delivery
from tests.receiver import make_secret
from tests.seeding import add_subscription
from tests.smtpserver import SmtpSink
from tests.workers import REPO_ROOT, Worker, settings_env, wait_until

SWEEP, CLEANUP = "tasks.sweep_stuck_deliveries", "tasks.cleanup_old_data"


@pytest.fixture
def beat_settings(make_settings: Callable[..., Settings], store_url: str) -> Settings:
    """The sweep every second, cleanup every three, no report; a waiting beat tries the lock twice a second."""
    return make_settings(database_url=store_url, sweep_schedule="1", cleanup_schedule="3", report_schedule="",
                         beat_lock_poll_s=0.5)


@pytest.fixture
def queues(beat_settings: Settings) -> Callable[[float], list[tuple[float, str]]]:
    """Empty task queues, and a reader that collects what beat sends to them for a while."""
    with Connection(beat_settings.broker_url) as conn:
        declare_topology(conn)
        task_queue(topology.HEAVY_QUEUE)(conn.default_channel).declare()
        for name in (topology.WEBHOOKS_QUEUE, topology.HEAVY_QUEUE):
            conn.default_channel.queue_purge(name)

    def collect(duration_s: float, until: Callable[[list[tuple[float, str]]], bool] = lambda _: False,
                ) -> list[tuple[float, str]]:
        seen: list[tuple[float, str]] = []
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline and not until(seen):
            for name in (topology.WEBHOOKS_QUEUE, topology.HEAVY_QUEUE):
                seen += drain_task_messages(beat_settings.broker_url, name)
            time.sleep(0.05)
        return sorted(seen)

    return collect  # type: ignore[return-value]


def _gaps(messages: list[tuple[float, str]], task: str) -> list[float]:
    return [b - a for (a, _), (b, _) in itertools.pairwise([m for m in messages if m[1] == task])]


def test_one_of_two_beats_schedules_and_the_other_takes_over_when_it_is_killed(
        beat_settings: Settings, queues: Callable[..., list[tuple[float, str]]], tmp_path: Path) -> None:
    """With two beats running, each entry is sent once per interval (not twice); after the holder is SIGKILLed
    the other takes the lock within a second or two and carries on from the last runs the first recorded."""
    first_settings = beat_settings.model_copy(update={"state_dir": tmp_path / "first"})
    second_settings = beat_settings.model_copy(update={"state_dir": tmp_path / "second"})
    with running_beat(first_settings, tmp_path / "first.log") as first:
        wait_until(lambda: "beat_lock_acquired" in first.log_text(), "the first beat to take the lock")
        with running_beat(second_settings, tmp_path / "second.log") as second:
            wait_until(lambda: "beat_lock_waiting" in second.log_text(), "the second beat to wait")
            together = queues(6.5)
            sweeps = [m for m in together if m[1] == SWEEP]
            assert 5 <= len(sweeps) <= 8, together
            assert min(_gaps(together, SWEEP)) > 0.7, together
            assert 1 <= sum(1 for m in together if m[1] == CLEANUP) <= 3, together
            assert "beat_lock_acquired" not in second.log_text()

            # Kill the holder right after it sent a cleanup: the next one is due three seconds after that.
            last_cleanup = queues(5, until=lambda seen: any(m[1] == CLEANUP for m in seen))
            first.kill()
            wait_until(lambda: "beat_lock_acquired" in second.log_text(), "the second beat to take over",
                       timeout_s=5)
            after = queues(6.5)
    cleanups = [t for t, task in last_cleanup + after if task == CLEANUP]
    assert min(_gaps(after, SWEEP)) > 0.7, after
    assert len([m for m in after if m[1] == SWEEP]) >= 4, after
    # Not at once on taking over (the second beat's own clock said it was overdue): on the first beat's rhythm.
    assert len(cleanups) >= 2 and min(b - a for a, b in itertools.pairwise(cleanups)) > 2.4, cleanups
    engine = make_engine(beat_settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            runs = {row.name: row.last_run_at for row in session.execute(select(BeatRun.name, BeatRun.last_run_at))}
    finally:
        engine.dispose()
    assert set(runs) == {"sweep-stuck-deliveries", "cleanup-old-data"}
    assert all(utcnow() - at < timedelta(seconds=10) for at in runs.values())


@pytest.fixture
def engine(beat_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(beat_settings.database_url)
    yield engine
    engine.dispose()


def test_beat_runs_cleanup_and_the_report_on_a_heavy_worker(beat_settings: Settings, engine: Engine,
                                                            tmp_path: Path) -> None:
    """Scheduled every second, cleanup run by a real worker removes exactly the events past retention, and the
    weekly report task emails the report (text body, CSV attachment) and keeps its result in the store."""
    smtp = SmtpSink()
    settings = beat_settings.model_copy(update={"cleanup_schedule": "1", "report_schedule": "1",
                                                "sweep_schedule": "", "state_dir": tmp_path,
                                                "report_recipients": ("ops@example.com",),
                                                "report_from": "reports@hookgate.example",
                                                "smtp_host": "127.0.0.1", "smtp_port": smtp.port})
    sessions: sessionmaker[Session] = make_sessionmaker(engine)
    subscription_id = add_subscription(sessions, "https://example.com/hook", make_secret())
    now = utcnow()
    expired = [add_event(sessions, now - timedelta(days=31)) for _ in range(3)]
    kept = [add_event(sessions, now - timedelta(days=29)), add_event(sessions, now - timedelta(days=31))]
    add_past_delivery(sessions, kept[1], subscription_id, DeliveryStatus.RETRYING, now - timedelta(days=31))
    add_past_delivery(sessions, expired[0], subscription_id, DeliveryStatus.SUCCEEDED, now - timedelta(days=31),
                      attempts=[(now - timedelta(days=31), 3.0, 200)])

    def events() -> set[str]:
        with sessions() as session:
            return set(session.execute(select(Event.pk)).scalars())

    with smtp, Worker(settings, tmp_path / "heavy.log", queues=[topology.HEAVY_QUEUE]) as worker, \
            running_beat(settings, tmp_path / "beat.log"):
        wait_until(lambda: events() == set(kept), "cleanup to remove the expired events", timeout_s=20)
        wait_until(lambda: "weekly_report_ready" in worker.log_text(), "a weekly report", timeout_s=20)
        mail = smtp.wait_for(1)[0]
    results = _task_results(engine, "tasks.generate_weekly_report")
    assert results, worker.log_text()
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    report_id = f"hookgate-weekly-{day - timedelta(days=7):%Y%m%d}-{day:%Y%m%d}"
    assert results[0]["report_id"] == report_id
    assert (mail.mail_from, mail.rcpt_tos) == ("reports@hookgate.example", ["ops@example.com"])
    assert mail.message["Message-ID"] == f"<{report_id}@hookgate.example>"
    assert subscription_id in mail.message.get_body(("plain",)).get_content()
    [attachment] = mail.message.iter_attachments()
    assert attachment.get_filename() == "weekly-report.csv"
    assert subscription_id in attachment.get_content()
    assert (results[0]["subscriptions"], results[0]["recipients"]) == (1, 1)
    assert all(r["done"] for r in _task_results(engine, CLEANUP))


def _task_results(engine: Engine, task: str) -> list[dict[str, object]]:
    """Successful results of ``task`` in Celery's result table in the store."""
    from celery.backends.database.models import TaskExtended

    table = TaskExtended.__table__
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.result).where(table.c.name == task, table.c.status == "SUCCESS")).all()
    return [orjson.loads(row.result) for row in rows]


def test_a_bad_schedule_stops_beat_naming_the_setting(tmp_path: Path) -> None:
    """`hookgate beat` with an impossible crontab exits 2 with the variable and the reason, before connecting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKGATE_")}
    env.update(HOOKGATE_CLEANUP_SCHEDULE="0 25 * * *", HOOKGATE_STATE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "beat"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert "HOOKGATE_CLEANUP_SCHEDULE" in done.stderr and "hour" in done.stderr, done.stderr


def test_celery_inspect_sees_the_scheduled_tasks_on_a_worker(make_settings: Callable[..., Settings], sqlite_url: str,
                                                             tmp_path: Path) -> None:
    """`celery inspect registered` lists the three beat tasks on a running worker, and `inspect scheduled` answers."""
    settings = make_settings(database_url=sqlite_url)
    env = {**os.environ, **settings_env(settings)}
    with Worker(settings, tmp_path / "worker.log") as worker:
        node = f"{worker.name}@{os.uname().nodename}"
        # Addressed to the worker, inspect returns on its answer instead of waiting out the timeout.
        command = [sys.executable, "-m", "celery", "-A", "consumers.celery_app:celery_app", "inspect", "--json",
                   "--timeout", "10", "--destination", node]
        registered, scheduled = (
            subprocess.run([*command, what], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
            for what in ("registered", "scheduled"))
    assert registered.returncode == 0, registered
    assert {SWEEP, CLEANUP, "tasks.generate_weekly_report"} <= set(_answer(registered.stdout)[node])
    assert scheduled.returncode == 0, scheduled
    assert list(_answer(scheduled.stdout)) == [node]


def _answer(stdout: str) -> dict[str, object]:
    return orjson.loads(stdout.strip().splitlines()[-1])


def _close_lock_connections(vhost: str) -> int:
    """Have RabbitMQ close the connection holding the beat lock on ``vhost`` (as a broker restart or a partition
    would): the exclusive queue's owner, so a waiting beat's attempt at that moment is never taken for it."""
    listing = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "-p", vhost, "name",
                              "owner_pid"], capture_output=True, text=True, timeout=30, check=True).stdout
    owners = [fields[1] for fields in (line.split("\t") for line in listing.splitlines())
              if len(fields) == 2 and fields[0] == topology.BEAT_LOCK_QUEUE]
    for owner in owners:
        subprocess.run(["rabbitmqctl", "close_connection", owner, "test closes the beat lock"],
                       capture_output=True, timeout=30, check=True)
    return len(owners)


def test_a_beat_whose_lock_connection_is_closed_stops_and_one_beat_carries_on(
        beat_settings: Settings, queues: Callable[..., list[tuple[float, str]]], tmp_path: Path) -> None:
    """When the broker closes the holder's lock connection, the holder stops sending at once and one of the two
    beats (never both) takes the lock again: the sweep goes on once per interval."""
    first_settings = beat_settings.model_copy(update={"state_dir": tmp_path / "first"})
    second_settings = beat_settings.model_copy(update={"state_dir": tmp_path / "second"})
    vhost = beat_settings.broker_url.rsplit("/", 1)[1]
    with running_beat(first_settings, tmp_path / "first.log") as first:
        wait_until(lambda: "beat_lock_acquired" in first.log_text(), "the first beat to take the lock")
        with running_beat(second_settings, tmp_path / "second.log") as second:
            wait_until(lambda: "beat_lock_waiting" in second.log_text(), "the second beat to wait")
            before = queues(2.5)
            assert _close_lock_connections(vhost) == 1
            wait_until(lambda: "beat_lock_lost" in first.log_text(), "the first beat to notice", timeout_s=5)
            wait_until(lambda: (first.log_text().count("beat_lock_acquired")
                                + second.log_text().count("beat_lock_acquired")) == 2,
                       "one beat to take the lock again", timeout_s=5)
            after = queues(4.5)
            acquisitions = first.log_text().count("beat_lock_acquired") + second.log_text().count("beat_lock_acquired")
    messages = before + after
    assert acquisitions == 2
    assert min(_gaps(messages, SWEEP)) > 0.7, messages
    assert len([m for m in after if m[1] == SWEEP]) >= 3, after
