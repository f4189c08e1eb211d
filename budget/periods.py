"""The periods caps count in: calendar periods in local time. "Today" runs from local midnight, "this week" from
Monday 00:00. A ledger row counts in the period of its ``started_at``, a reservation in the period of its
``created_at``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from .ledger import require_aware

__all__ = ["PERIODS", "Calendar", "Period", "period_bounds"]

Period = Literal["day", "week"]
PERIODS: tuple[Period, ...] = ("day", "week")


@dataclass(frozen=True, slots=True)
class Calendar:
    """One moment and the zone whose calendar the periods follow: ``moment``'s own, or the system's."""

    moment: dt.datetime
    system_local: bool

    @classmethod
    def at(cls, now: dt.datetime | None) -> Calendar:
        if now is None:
            return cls(dt.datetime.now().astimezone(), system_local=True)
        return cls(require_aware(now, "now"), system_local=False)

    def bounds(self, period: Period) -> tuple[dt.datetime, dt.datetime]:
        first = self.moment.date()
        if period == "week":
            first -= dt.timedelta(days=first.weekday())  # Monday
        after = first + dt.timedelta(days=1 if period == "day" else 7)
        return self._midnight(first), self._midnight(after)

    def _midnight(self, day: dt.date) -> dt.datetime:
        naive = dt.datetime.combine(day, dt.time.min)
        if self.system_local:
            # astimezone() on a naive time takes the system offset in force at that midnight, not now's: a week
            # can span a daylight-saving change, and now() only carries a fixed offset.
            return naive.astimezone()
        return naive.replace(tzinfo=self.moment.tzinfo)


def period_bounds(period: Period, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """``[start, end)`` of the day or week (from Monday 00:00) that holds ``now``.

    The calendar is that of ``now``'s own time zone; without ``now``, the system's local time now.

    Example:
        >>> period_bounds("week", dt.datetime(2024, 3, 13, 9, tzinfo=dt.timezone.utc))[0].isoformat()
        '2024-03-11T00:00:00+00:00'
    """
    return Calendar.at(now).bounds(period)
