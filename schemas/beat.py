"""The shape of a beat schedule: a crontab line (UTC) or a number of seconds between runs, or off."""

from __future__ import annotations

import math
from dataclasses import dataclass

from celery.schedules import ParseException, crontab_parser

__all__ = ["BeatSchedule", "parse_beat_schedule", "validate_beat_schedule"]

# minute, hour, day of month, month, day of week: the ranges crontab_parser checks each field against.
_CRONTAB_FIELDS = (("minute", 60, 0), ("hour", 24, 0), ("day of month", 31, 1), ("month", 12, 1),
                   ("day of week", 7, 0))


@dataclass(frozen=True, slots=True)
class BeatSchedule:
    """Either ``every_s`` seconds between runs, or the five crontab fields."""

    every_s: float | None = None
    crontab: tuple[str, str, str, str, str] | None = None


def parse_beat_schedule(text: str) -> BeatSchedule | None:
    """``"60"`` -> every 60 s; ``"0 2 * * *"`` -> daily at 02:00; ``""`` -> None (the entry is off)."""
    text = text.strip()
    if not text:
        return None
    fields = text.split()
    if len(fields) == 1:
        try:
            every_s = float(fields[0])
        except ValueError:
            raise ValueError(f"a schedule is a number of seconds or five crontab fields, not {text!r}") from None
        if not math.isfinite(every_s) or every_s <= 0:
            raise ValueError(f"a schedule's interval is a positive number of seconds, not {text!r}")
        return BeatSchedule(every_s=every_s)
    if len(fields) != len(_CRONTAB_FIELDS):
        raise ValueError(f"a crontab schedule has five fields (minute hour day month weekday), not {text!r}")
    for value, (name, size, first) in zip(fields, _CRONTAB_FIELDS, strict=True):
        try:
            crontab_parser(size, first).parse(value)
        except (ParseException, ValueError) as exc:
            raise ValueError(f"bad {name} field {value!r} in schedule {text!r}: {exc}") from None
    minute, hour, day_of_month, month, day_of_week = fields
    return BeatSchedule(crontab=(minute, hour, day_of_month, month, day_of_week))


def validate_beat_schedule(text: str) -> str:
    parse_beat_schedule(text)
    return text.strip()
