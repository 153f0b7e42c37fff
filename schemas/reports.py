"""The weekly delivery report: one row per subscription, rendered as a plain-text table and as CSV."""

from __future__ import annotations

import csv
import io
from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict

from schemas.email import parse_address

__all__ = ["ReportRow", "WeeklyReport", "validate_recipients"]

_COLUMNS = ("subscription_id", "description", "delivered", "failed", "dead", "p50_ms", "p99_ms")
_NUMERIC = frozenset(_COLUMNS[2:])
# A description is a label for people, not data: long ones are cut in the table (the CSV keeps them whole).
_DESCRIPTION_WIDTH = 40


class ReportRow(BaseModel):
    """One subscription's week: successful and failed attempts, deliveries that went dead, latency.

    Latency is from the event's arrival to the end of the successful attempt, retries included;
    None when nothing was delivered.
    """

    model_config = ConfigDict(frozen=True)

    subscription_id: str
    description: str
    delivered: int
    failed: int
    dead: int
    p50_ms: float | None
    p99_ms: float | None


class WeeklyReport(BaseModel):
    """Every subscription that exists, over ``[period_start, period_end)``."""

    model_config = ConfigDict(frozen=True)

    period_start: AwareDatetime
    period_end: AwareDatetime
    rows: tuple[ReportRow, ...]

    @property
    def report_id(self) -> str:
        """Stable for one period: a re-run of the task names the same report (a mail's Message-ID, say)."""
        return f"hookgate-weekly-{self.period_start:%Y%m%d}-{self.period_end:%Y%m%d}"

    @property
    def title(self) -> str:
        return f"hookgate deliveries {_day(self.period_start)} to {_day(self.period_end)} (UTC)"

    def _cells(self, row: ReportRow, *, table: bool) -> list[str]:
        values = row.model_dump()
        cells = []
        for column in _COLUMNS:
            value = values[column]
            if value is None:
                cells.append("-" if table else "")
            elif isinstance(value, float):
                cells.append(f"{value:.1f}")
            elif column == "description" and table and len(value) > _DESCRIPTION_WIDTH:
                cells.append(value[:_DESCRIPTION_WIDTH - 1] + "…")
            else:
                cells.append(str(value))
        return cells

    def to_text(self) -> str:
        """A fixed-width table under the title, numbers right-aligned, then the totals."""
        rows = [list(_COLUMNS), *(self._cells(row, table=True) for row in self.rows)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]

        def line(cells: list[str]) -> str:
            return "  ".join(cell.rjust(w) if name in _NUMERIC else cell.ljust(w)
                             for cell, w, name in zip(cells, widths, _COLUMNS, strict=True)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        totals = (f"{len(self.rows)} subscriptions: {sum(r.delivered for r in self.rows)} delivered, "
                  f"{sum(r.failed for r in self.rows)} failed attempts, {sum(r.dead for r in self.rows)} dead")
        return "\n".join([self.title, "", line(rows[0]), rule, *(line(r) for r in rows[1:]), "", totals]) + "\n"

    def to_csv(self) -> str:
        """The same rows as CSV with a header line; empty cells for no latency."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(_COLUMNS)
        writer.writerows(self._cells(row, table=False) for row in self.rows)
        return out.getvalue()


def validate_recipients(addresses: tuple[str, ...]) -> tuple[str, ...]:
    """Each address normalised, or ValueError naming the one that is not an address."""
    return tuple(parse_address(address) for address in addresses)


def _day(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M}"
