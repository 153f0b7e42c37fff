"""When a failed delivery is tried again: a schedule of delays with jitter, bent by ``Retry-After``."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from schemas.settings import Settings

__all__ = ["RetryPolicy", "parse_retry_after"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``schedule[i]`` is the delay before attempt ``i + 1``; its length is the number of attempts.

    The first entry delays the first attempt only where a channel defers it; a failed attempt
    ``n`` is followed, after ``schedule[n]`` seconds ±``jitter``, by attempt ``n + 1``.
    """

    schedule: tuple[float, ...]
    # The longest wait a receiver's Retry-After can impose.
    retry_after_max_s: float
    jitter: float = 0.2

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.retry_schedule, settings.retry_after_max_s)

    @property
    def max_attempts(self) -> int:
        return len(self.schedule)

    def with_schedule(self, schedule: Sequence[float] | None) -> RetryPolicy:
        """This policy with a subscription's own schedule, when it has one."""
        if not schedule:
            return self
        return RetryPolicy(tuple(schedule), self.retry_after_max_s, self.jitter)

    def delay_after(self, attempt: int, *, retry_after_s: float | None = None,
                    rng: random.Random | None = None) -> int | None:
        """Whole seconds to wait after failed ``attempt`` (1-based), or None when the schedule is spent.

        Whole seconds because the broker's delayed delivery counts in seconds; rounded up, so a
        ``Retry-After`` is never undercut. A ``Retry-After`` beyond ``retry_after_max_s`` is capped.
        """
        if attempt >= len(self.schedule):
            return None
        # The module's generator, not one of our own: Python reseeds it in each forked child.
        uniform = rng.uniform if rng is not None else random.uniform
        delay = self.schedule[attempt] * uniform(1 - self.jitter, 1 + self.jitter)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.retry_after_max_s))
        return math.ceil(delay)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
