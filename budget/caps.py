"""Caps on what all jobs spend per day and per week, their table, and what is spent and reserved against them.

Caps (:class:`Cap`) come from two places: the one ``Budget.set_cap`` stores in the file (``burst budget set``), for
every process and folder, and the ``config_caps`` a :class:`~burst_jupyter.budget.Budget` is opened with
(``daily-budget`` in a config file the session read), for that process's jobs only, never stored. Each caps what
all jobs together spend in the period, wherever they started; the lowest in force holds.

The queries here run under the budget's lock, inside its transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from .ledger import LedgerRow, format_usd, select_rows
from .periods import PERIODS, Calendar, Period
from .reservations import reserved_between

__all__ = ["STORED", "BudgetSnapshot", "Cap", "CapUsage", "read_snapshot", "store_cap", "stored_caps"]

_WARN_AT = Decimal("0.8")
_LABEL = {"day": "Today", "week": "This week"}
_ADJECTIVE = {"day": "daily", "week": "weekly"}

#: Where the cap stored in the budget file comes from.
STORED = "set with burst budget set"


@dataclass(frozen=True, slots=True)
class Cap:
    """One cap on what all jobs spend in ``period``: where it comes from (``origin``: :data:`STORED`, or a config
    file's ``"daily-budget in /p/pyproject.toml [tool.burst]"``) and whose jobs it holds for (``scope``)."""

    period: Period
    amount: Decimal
    origin: str = STORED
    scope: str = "every folder"

    def describe(self, holds: bool = False) -> str:
        """``"daily cap $20.00: <origin>, for <scope>"``, and ``" (holds: the lowest)"`` when ``holds``."""
        line = f"{_ADJECTIVE[self.period]} cap {format_usd(self.amount)}: {self.origin}, for {self.scope}"
        return line + " (holds: the lowest)" if holds else line


@dataclass(frozen=True, slots=True)
class CapUsage:
    """Spend against one cap in the current period. ``spent`` counts ledger rows (a job with a row of unknown cost
    counts at least all that was reserved for it, the most it was allowed to cost); ``reserved`` counts open
    reservations. ``cap`` is the lowest cap in force, ``source`` its :attr:`Cap.origin`."""

    period: Period
    spent: Decimal
    reserved: Decimal
    cap: Decimal | None
    source: str | None = field(default=None, compare=False)  # where the cap is written, not an amount

    @property
    def used(self) -> Decimal:
        return self.spent + self.reserved

    @property
    def remaining(self) -> Decimal | None:
        """What a new job may still reserve (never below 0); ``None`` without a cap."""
        return None if self.cap is None else max(Decimal(0), self.cap - self.used)

    @property
    def fraction(self) -> float | None:
        """``(spent + reserved) / cap``; ``None`` without a cap. A $0 cap counts as full."""
        if self.cap is None:
            return None
        return 1.0 if self.cap == 0 else float(self.used / self.cap)

    @property
    def warning(self) -> bool:
        """At or past 80% of the cap (compared exactly, in Decimal)."""
        return self.cap is not None and (self.cap == 0 or self.used >= self.cap * _WARN_AT)

    @property
    def warning_line(self) -> str | None:
        """``"daily budget at 85% ($17.00 of $20.00)"`` when :attr:`warning`, else ``None``."""
        if self.cap is None or not self.warning:
            return None
        return (
            f"{_ADJECTIVE[self.period]} budget at {self._percent()}% "
            f"({format_usd(self.used)} of {format_usd(self.cap)})"
        )

    def refusal(self, amount: Decimal) -> str | None:
        """Why a new job may not hold ``amount`` against this cap, one line naming the cap; ``None`` when it fits
        (or there is no cap)."""
        if self.cap is None or self.used + amount <= self.cap:
            return None
        source = "" if self.source in (None, STORED) else f" ({self.source})"
        return (
            f"{_ADJECTIVE[self.period]} budget: {format_usd(self.spent)} spent"
            f" + {format_usd(self.reserved)} reserved + {format_usd(amount)} for this job"
            f" > {format_usd(self.cap)} cap{source}"
        )

    @property
    def label(self) -> str:
        """``"Today: $12.50 / $50.00 (25%)"``; open reservations show as ``"+ $3.00 reserved"``."""
        amount = format_usd(self.spent)
        if self.reserved:
            amount += f" + {format_usd(self.reserved)} reserved"
        if self.cap is None:
            return f"{_LABEL[self.period]}: {amount} (no cap)"
        return f"{_LABEL[self.period]}: {amount} / {format_usd(self.cap)} ({self._percent()}%)"

    def _percent(self) -> int:
        if not self.cap:
            return 100
        return int((self.used * 100 / self.cap).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """Usage of both caps at one moment. ``str()`` is the two labels, one per line. ``caps``: every cap in
    force, lowest first in each period."""

    day: CapUsage
    week: CapUsage
    caps: tuple[Cap, ...] = ()

    def __iter__(self) -> Iterator[CapUsage]:
        return iter((self.day, self.week))

    def __str__(self) -> str:
        return "\n".join(usage.label for usage in self)

    def cap_lines(self) -> list[str]:
        """Each cap in force and where it comes from; the one that holds is marked where a period has several."""
        lines = []
        for period in PERIODS:
            mine = [cap for cap in self.caps if cap.period == period]
            lines += [cap.describe(holds=i == 0 and len(mine) > 1) for i, cap in enumerate(mine)]
            if not mine:
                lines.append(f"{_ADJECTIVE[period]} cap: none")
        return lines


def stored_caps(conn: sqlite3.Connection) -> dict[Period, Decimal | None]:
    """The caps stored in the file, ``{"day": ..., "week": ...}``; ``None`` where none is set."""
    found = dict(conn.execute("SELECT period, amount_usd FROM budget_caps").fetchall())
    return {period: (Decimal(found[period]) if period in found else None) for period in PERIODS}


def store_cap(conn: sqlite3.Connection, period: Period, amount: Decimal | None) -> None:
    """Store (``None``: remove) the cap for ``period``; the caller checked both."""
    if amount is None:
        conn.execute("DELETE FROM budget_caps WHERE period = ?", (period,))
    else:
        conn.execute(
            "INSERT INTO budget_caps (period, amount_usd) VALUES (?, ?)"
            " ON CONFLICT (period) DO UPDATE SET amount_usd = excluded.amount_usd",
            (period, f"{amount:f}"),
        )


def read_snapshot(conn: sqlite3.Connection, calendar: Calendar, config_caps: tuple[Cap, ...]) -> BudgetSnapshot:
    """Spent and reserved in the day and week holding ``calendar``'s moment, against the lowest cap in force
    among the stored ones and ``config_caps``."""
    stored = [Cap(period, amount) for period, amount in stored_caps(conn).items() if amount is not None]
    # Lowest first; on a tie the stored cap, which holds for every folder, is the one named.
    caps = tuple(sorted((*stored, *config_caps), key=lambda cap: (PERIODS.index(cap.period), cap.amount)))

    def one(period: Period) -> CapUsage:
        start, end = calendar.bounds(period)
        jobs: dict[str, list[LedgerRow]] = {}
        for row in select_rows(conn, since=start, until=end):
            jobs.setdefault(row.job_id, []).append(row)
        spent = sum((_job_spent(rows) for rows in jobs.values()), Decimal(0))
        reserved = reserved_between(conn, start, end)
        holds = next((cap for cap in caps if cap.period == period), None)
        if holds is None:
            return CapUsage(period, spent, reserved, None)
        return CapUsage(period, spent, reserved, holds.amount, holds.origin)

    return BudgetSnapshot(day=one("day"), week=one("week"), caps=caps)


def _job_spent(rows: list[LedgerRow]) -> Decimal:
    """What one job's rows (its attempts) count against a cap: their known costs and, when some cost is unknown,
    at least all that was reserved for the job, the most it was allowed to cost. Under-counting would let the
    cap be passed."""
    known = sum((row.actual_usd for row in rows if row.actual_usd is not None), Decimal(0))
    if all(row.actual_usd is not None for row in rows):
        return known
    return max(known, sum((row.reserved_usd for row in rows), Decimal(0)))
