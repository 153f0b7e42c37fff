"""The weekly report: counts and latency percentiles per subscription on each engine, as text and CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from consumers.store.database import make_engine, make_sessionmaker, utcnow
from consumers.store.models import Subscription
from consumers.store.reports import weekly_report
from schemas.deliveries import DeliveryStatus
from schemas.reports import ReportRow, WeeklyReport
from schemas.settings import Settings
from tests.history import add_event, add_past_delivery
from tests.receiver import make_secret
from tests.seeding import add_subscription

END = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
START = END - timedelta(days=7)


@pytest.fixture
def sessions(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(store_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _delivered(sessions: sessionmaker[Session], subscription_id: str, received_at: datetime, latency_ms: float,
               failures: int = 0) -> None:
    """A delivery whose success ends ``latency_ms`` after its event arrived (the attempt itself takes 10 ms)."""
    started = received_at + timedelta(milliseconds=latency_ms - 10)
    attempts = [(received_at + timedelta(milliseconds=n), 1.0, 503) for n in range(failures)]
    add_past_delivery(sessions, add_event(sessions, received_at), subscription_id, DeliveryStatus.SUCCEEDED, started,
                      attempts=[*attempts, (started, 10.0, 200)])


def test_the_report_counts_and_ranks_each_subscription(sessions: sessionmaker[Session]) -> None:
    """Delivered and failed attempts and dead deliveries of the period per subscription, nearest-rank p50/p99 of
    the delivered ones' latency; nothing from before the period; a quiet subscription reads zero; deleted ones
    are left out."""
    busy = add_subscription(sessions, "https://example.com/a", make_secret())
    with sessions.begin() as session:
        session.execute(update(Subscription).where(Subscription.id == busy).values(description="shop orders"))
    quiet = add_subscription(sessions, "https://example.com/b", make_secret())
    add_subscription(sessions, "https://example.com/c", make_secret(), deleted_at=utcnow())
    inside, before = END - timedelta(days=2), START - timedelta(days=1)
    for n in range(1, 11):  # 100 ms .. 1000 ms; two of them after a failed attempt each
        _delivered(sessions, busy, inside + timedelta(minutes=n), 100.0 * n, failures=1 if n in (3, 7) else 0)
    _delivered(sessions, busy, before, 99_000.0, failures=4)  # before the period
    for updated_at in (inside, inside, before):
        add_past_delivery(sessions, add_event(sessions, updated_at), busy, DeliveryStatus.DEAD, updated_at,
                          attempts=[(updated_at, 5.0, None)])

    report = weekly_report(sessions, START, END)

    assert (report.period_start, report.period_end) == (START, END)
    by_id = {row.subscription_id: row for row in report.rows}
    assert set(by_id) == {busy, quiet}
    row = by_id[busy]
    assert (row.description, row.delivered, row.failed, row.dead) == ("shop orders", 10, 4, 2)
    assert row.p50_ms == pytest.approx(500.0, abs=0.5)
    assert row.p99_ms == pytest.approx(1000.0, abs=0.5)
    assert by_id[quiet] == ReportRow(subscription_id=quiet, description="", delivered=0, failed=0, dead=0,
                                     p50_ms=None, p99_ms=None)


def test_the_report_renders_as_a_table_and_as_csv() -> None:
    """The text has the period, one aligned line per subscription and the totals; the CSV reads back as the rows."""
    start = datetime(2026, 11, 23, tzinfo=UTC)
    rows = (
        ReportRow(subscription_id="sub-1", description="shop orders " * 5, delivered=1200, failed=31, dead=2,
                  p50_ms=84.25, p99_ms=1934.0),
        ReportRow(subscription_id="sub-2", description="", delivered=0, failed=0, dead=0, p50_ms=None, p99_ms=None),
    )
    report = WeeklyReport(period_start=start, period_end=start + timedelta(days=7), rows=rows)

    text = report.to_text().splitlines()
    assert text[0] == "hookgate deliveries 2026-11-23 00:00 to 2026-11-30 00:00 (UTC)"
    header, rule, first, second = text[2:6]
    assert header.split() == ["subscription_id", "description", "delivered", "failed", "dead", "p50_ms", "p99_ms"]
    assert set(rule) == {"-", " "}
    assert first.split()[:3] == ["sub-1", "shop", "orders"] and "…" in first
    assert first.endswith("1200      31     2    84.2  1934.0")
    assert second.split() == ["sub-2", "0", "0", "0", "-", "-"]
    assert len({len(line) for line in (rule, first)}) == 1
    assert text[-1] == "2 subscriptions: 1200 delivered, 31 failed attempts, 2 dead"

    parsed = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert parsed == [
        {"subscription_id": "sub-1", "description": "shop orders " * 5, "delivered": "1200", "failed": "31",
         "dead": "2", "p50_ms": "84.2", "p99_ms": "1934.0"},
        {"subscription_id": "sub-2", "description": "", "delivered": "0", "failed": "0", "dead": "0", "p50_ms": "",
         "p99_ms": ""},
    ]
    assert report.report_id == "hookgate-weekly-20261123-20261130"


def test_report_recipients_are_a_comma_separated_list_of_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOOKGATE_REPORT_RECIPIENTS splits on commas; an entry that is not an address is refused, named."""
    monkeypatch.setenv("HOOKGATE_REPORT_RECIPIENTS", "ops@example.com, finance@example.org")
    assert Settings().report_recipients == ("ops@example.com", "finance@example.org")
    monkeypatch.setenv("HOOKGATE_REPORT_RECIPIENTS", "ops@example.com,ops example.com")
    with pytest.raises(ValidationError, match=r"'ops example\.com' is not an email address"):
        Settings()
