"""The retry policy: the schedule with its jitter, Retry-After, and the schedule's settings."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from pydantic import ValidationError

from consumers.retry_policy import RetryPolicy, parse_retry_after
from schemas.retries import DEFAULT_RETRY_SCHEDULE
from schemas.settings import Settings


def test_default_schedule_is_eight_attempts_over_about_a_day() -> None:
    """Immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h."""
    assert Settings().retry_schedule == DEFAULT_RETRY_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert RetryPolicy.from_settings(Settings()).max_attempts == 8


def test_each_delay_is_within_twenty_percent_and_whole_seconds() -> None:
    """Attempt n is followed by schedule[n] ±20 %, rounded up; the spread really is used."""
    policy = RetryPolicy.from_settings(Settings())
    rng = random.Random(7)
    for attempt in range(1, 8):
        nominal = DEFAULT_RETRY_SCHEDULE[attempt]
        waits = [policy.delay_after(attempt, rng=rng) for _ in range(200)]
        assert all(isinstance(w, int) and nominal * 0.8 <= w <= nominal * 1.2 + 1 for w in waits)
        assert max(waits) - min(waits) >= int(nominal * 0.3)
    assert policy.delay_after(8) is None


def test_retry_after_is_never_undercut_and_is_capped() -> None:
    """A Retry-After longer than the scheduled delay wins; one beyond the cap is cut to the cap."""
    policy = RetryPolicy((0, 1, 1), retry_after_max_s=60)
    assert policy.delay_after(1, retry_after_s=2.2) == 3
    assert policy.delay_after(1, retry_after_s=0.1) in (1, 2)
    assert policy.delay_after(1, retry_after_s=3600) == 60
    assert policy.delay_after(3, retry_after_s=5) is None


def test_a_subscription_schedule_replaces_the_global_one() -> None:
    policy = RetryPolicy.from_settings(Settings()).with_schedule((0, 10))
    assert policy.max_attempts == 2 and 8 <= policy.delay_after(1) <= 12
    assert RetryPolicy.from_settings(Settings()).with_schedule(None).max_attempts == 8


def test_parse_retry_after_seconds_and_http_date() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("-5") is None


def test_schedule_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOOKGATE_RETRY_SCHEDULE is comma-separated seconds; nonsense is refused at start."""
    monkeypatch.setenv("HOOKGATE_RETRY_SCHEDULE", "0,5,300")
    assert Settings().retry_schedule == (0, 5, 300)
    for bad in ("", "0,-1", "0,nan", "0,x", "0,1000000"):
        monkeypatch.setenv("HOOKGATE_RETRY_SCHEDULE", bad)
        with pytest.raises(ValidationError):
            Settings()
