"""The shape of a retry schedule, shared by the settings and by subscriptions."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["DEFAULT_RETRY_SCHEDULE", "MAX_SCHEDULE_LENGTH", "validate_retry_schedule"]

# Delays before each attempt, in seconds: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h:
# eight attempts over about 27.5 hours.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
MAX_SCHEDULE_LENGTH = 50
# A week: longer waits outlive any sensible retention of the delivery they belong to.
_MAX_DELAY_S = 7 * 24 * 3600


def validate_retry_schedule(schedule: Sequence[float]) -> tuple[float, ...]:
    if not 1 <= len(schedule) <= MAX_SCHEDULE_LENGTH:
        raise ValueError(f"a retry schedule has 1 to {MAX_SCHEDULE_LENGTH} delays")
    for delay in schedule:
        if not math.isfinite(delay) or not 0 <= delay <= _MAX_DELAY_S:
            raise ValueError(f"a retry delay is 0 to {_MAX_DELAY_S} seconds, not {delay}")
    return tuple(float(delay) for delay in schedule)
