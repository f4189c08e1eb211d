"""Caps per day and per week, and reservations that hold each job's worst case before anything is rented.

A job reserves its cap before launch; the check "spent + reserved + this job <= cap" and the insert happen
under one ``BEGIN IMMEDIATE``, so kernels racing for the last dollars cannot both win. Settling writes the
ledger row and drops the reservation in one transaction. A job retried on another instance first records each
attempt that ended early, each in one transaction that also takes its cost out of the job's reservation, so
what the job has spent plus what it still holds never passes what it reserved.

Periods are calendar periods in local time: "today" runs from local midnight, "this week" from Monday 00:00.
A ledger row counts in the period of its ``started_at``, a reservation in the period of its ``created_at``.

Caps (:class:`Cap`) come from two places: the one ``set_cap`` stores in the file (``burst budget set``), for every
process and folder, and the ``config_caps`` a :class:`Budget` is opened with (``daily-budget`` in a config file
the session read), for that process's jobs only, never stored. Each caps what all jobs together spend in the
period, wherever they started; the lowest in force holds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import KW_ONLY, dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Literal

from ..db import connect, write_transaction
from ..errors import BudgetExceededError
from .ledger import (
    LedgerRow,
    check_usd,
    ensure_schema,
    find_row,
    format_usd,
    from_db_time,
    insert_row,
    require_aware,
    select_rows,
    to_db_time,
)
from .table import LedgerTable

__all__ = ["PERIODS", "STORED", "Budget", "BudgetSnapshot", "Cap", "CapUsage", "Period", "Reservation", "period_bounds"]

Period = Literal["day", "week"]
PERIODS: tuple[Period, ...] = ("day", "week")

_WARN_AT = Decimal("0.8")
_LABEL = {"day": "Today", "week": "This week"}
_ADJECTIVE = {"day": "daily", "week": "weekly"}

#: Where the cap stored in the budget file comes from.
STORED = "set with burst budget set"


# --- periods ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Clock:
    """One moment and the zone whose calendar the periods follow: ``moment``'s own, or the system's."""

    moment: dt.datetime
    system_local: bool

    @classmethod
    def at(cls, now: dt.datetime | None) -> _Clock:
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
    return _Clock.at(now).bounds(period)


# --- values ----------------------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class Reservation:
    """Money held for a job that has not settled. ``warnings`` is filled only by :meth:`Budget.reserve`."""

    job_id: str
    amount: Decimal
    created_at: dt.datetime
    warnings: tuple[str, ...] = ()
    _: KW_ONLY
    name: str | None = None
    provider: str | None = None
    gpu: str | None = None


# --- the enforcer ----------------------------------------------------------------------------------------


class Budget:
    """Caps, reservations and the ledger in one SQLite file (shared with the state store).

    Safe to construct in many processes at once (schema creation is serialized), and to share between the
    threads of one process (one connection, used under a lock). ``config_caps`` hold for this object's
    reservations besides the stored ones (the module docstring says how caps combine).

    Example:
        >>> budget = Budget(paths.db_path())  # doctest: +SKIP
        >>> budget.set_cap("day", Decimal("20"))  # doctest: +SKIP
        >>> budget.reserve(job_id="j1", name=None, provider="local", gpu="H100", amount=Decimal(17)).warnings
        ... # doctest: +SKIP
        ('daily budget at 85% ($17.00 of $20.00)',)
    """

    def __init__(self, path: Path, *, config_caps: Iterable[Cap] = ()) -> None:
        self.path = Path(path)
        self.config_caps = tuple(config_caps)
        self._lock = threading.Lock()
        self._conn = connect(self.path)
        try:
            ensure_schema(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"Budget({str(self.path)!r})"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Budget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # One read transaction: a snapshot's several SELECTs see one state of the file, so a job settling in
        # between is not counted both as reserved and as spent.
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, write_transaction(self._conn) as conn:
            yield conn

    # --- reservations ---

    def reserve(
        self,
        *,
        job_id: str,
        name: str | None,
        provider: str,
        gpu: str,
        amount: Decimal,
        now: dt.datetime | None = None,
    ) -> Reservation:
        """Hold ``amount`` (the job's worst case) against today's and this week's caps, atomically.

        Raises :class:`BudgetExceededError` (one line naming the cap) when spent + reserved + ``amount`` would
        pass a cap, and then holds nothing. Raises ``ValueError`` when ``job_id`` already has a reservation
        or any ledger row. The returned ``warnings`` hold one line per cap at or past 80% with this job counted.
        """
        amount = check_usd(amount, "amount")
        clock = _Clock.at(now)
        with self._write() as conn:
            if _reservation_row(conn, job_id) is not None:
                raise ValueError(f"job {job_id!r} already has a reservation")
            if find_row(conn, job_id) is not None:
                raise ValueError(f"job {job_id!r} is already settled in the ledger")
            usage = _usage(conn, clock, self.config_caps)
            for cap_usage in usage:
                if cap_usage.cap is not None and cap_usage.used + amount > cap_usage.cap:
                    source = "" if cap_usage.source in (None, STORED) else f" ({cap_usage.source})"
                    raise BudgetExceededError(
                        f"{_ADJECTIVE[cap_usage.period]} budget: {format_usd(cap_usage.spent)} spent"
                        f" + {format_usd(cap_usage.reserved)} reserved + {format_usd(amount)} for this job"
                        f" > {format_usd(cap_usage.cap)} cap{source}"
                    )
            conn.execute(
                "INSERT INTO budget_reservations (job_id, name, provider, gpu, amount_usd, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, name, provider, gpu, f"{amount:f}", to_db_time(clock.moment)),
            )
        after = (replace(cap_usage, reserved=cap_usage.reserved + amount) for cap_usage in usage)
        return Reservation(
            job_id,
            amount,
            clock.moment.astimezone(dt.timezone.utc),
            tuple(line for cap_usage in after if (line := cap_usage.warning_line) is not None),
            name=name,
            provider=provider,
            gpu=gpu,
        )

    def release(self, job_id: str) -> None:
        """Drop ``job_id``'s reservation without a ledger row (nothing was rented). Idempotent."""
        with self._write() as conn:
            conn.execute("DELETE FROM budget_reservations WHERE job_id = ?", (job_id,))

    def open_reservations(self) -> list[Reservation]:
        """Reservations not yet settled or released, oldest first (``warnings`` empty)."""
        with self._read() as conn:
            return _open_reservations(conn)

    # --- the ledger ---

    def record_attempt(
        self,
        job_id: str,
        *,
        attempt: int,
        provider: str,
        instance_id: str | None,
        gpu: str,
        rate_usd_per_hour: Decimal,
        started_at: dt.datetime,
        ended_at: dt.datetime | None,
        actual_usd: Decimal | None,
        status: str,
        name: str | None = None,
        message: str | None = None,
        now: dt.datetime | None = None,
    ) -> LedgerRow:
        """Append the row of an attempt that ended before the job did (``status`` e.g. ``"preempted"``), and in
        the same transaction take ``actual_usd`` out of the job's open reservation (never below 0): the job's
        spent plus still reserved stays within what it reserved. The job keeps its reservation for the next
        attempt; :meth:`settle` writes the final attempt's row.

        Idempotent per (``job_id``, ``attempt``): a second call returns the first row and lowers nothing. An
        unknown cost (``None``) leaves the reservation as it is: the money stays held, and once settled the job
        counts at least its whole reservation (see :class:`CapUsage`).
        ``reserved_usd`` is what was taken from the reservation. Other arguments are as for :meth:`settle`.
        """
        row = _new_row(
            job_id, attempt, provider, instance_id, gpu, rate_usd_per_hour, started_at, ended_at, actual_usd,
            status, name, message, now,
        )
        with self._write() as conn:
            existing = find_row(conn, job_id, attempt)
            if existing is not None:
                return existing
            held = _reservation_row(conn, job_id)
            if held is not None:
                amount = Decimal(held["amount_usd"])
                taken = Decimal(0) if row.actual_usd is None else min(row.actual_usd, amount)
                row = replace(row, reserved_usd=taken, name=row.name if row.name is not None else held["name"])
                conn.execute(
                    "UPDATE budget_reservations SET amount_usd = ? WHERE job_id = ?",
                    (f"{amount - taken:f}", job_id),
                )
            return _insert_and_read_back(conn, row)

    def settle(
        self,
        job_id: str,
        *,
        provider: str,
        instance_id: str | None,
        gpu: str,
        rate_usd_per_hour: Decimal,
        started_at: dt.datetime,
        ended_at: dt.datetime | None,
        actual_usd: Decimal | None,
        status: str,
        name: str | None = None,
        message: str | None = None,
        now: dt.datetime | None = None,
        attempt: int = 1,
    ) -> LedgerRow:
        """Append the row of the job's final ``attempt`` and drop its reservation, in one transaction.

        Idempotent per (``job_id``, ``attempt``): when that attempt already has a row, that row is returned
        unchanged and the arguments are ignored (the kernel and a detached reaper may both settle; the first one
        wins). The reservation is dropped either way: the job is over. ``actual_usd`` is this attempt's cost
        alone (earlier attempts have their own rows); ``None`` records an unknown cost. ``reserved_usd`` is what
        the reservation still held, ``Decimal(0)`` without one; ``name`` defaults to the reservation's. ``now`` is
        the ``recorded_at`` time.
        """
        row = _new_row(
            job_id, attempt, provider, instance_id, gpu, rate_usd_per_hour, started_at, ended_at, actual_usd,
            status, name, message, now,
        )
        with self._write() as conn:
            stored = find_row(conn, job_id, attempt)
            if stored is None:
                held = _reservation_row(conn, job_id)
                if held is not None:
                    row = replace(
                        row,
                        reserved_usd=Decimal(held["amount_usd"]),
                        name=row.name if row.name is not None else held["name"],
                    )
                stored = _insert_and_read_back(conn, row)
            conn.execute("DELETE FROM budget_reservations WHERE job_id = ?", (job_id,))
        return stored

    def rows(self, *, since: dt.datetime | None = None) -> list[LedgerRow]:
        """Ledger rows, oldest ``started_at`` first; with ``since``, those that started at or after it."""
        with self._read() as conn:
            return select_rows(conn, since=since)

    def table(self, *, tz: dt.tzinfo | None = None) -> LedgerTable:
        """All rows and the open reservations as a :class:`LedgerTable` (times shown in ``tz``, the system's local
        zone by default)."""
        with self._read() as conn:
            rows, held = select_rows(conn, since=None), _open_reservations(conn)
        return LedgerTable(rows, reservations=held, tz=tz)

    # --- caps ---

    def set_cap(self, period: Period, usd: Decimal | None) -> None:
        """Set (``None``: remove) the cap for ``"day"`` or ``"week"``, for every process using this file."""
        if period not in PERIODS:
            raise ValueError(f"period must be one of {PERIODS}, got {period!r}")
        cap = None if usd is None else check_usd(usd, f"{period} cap")
        with self._write() as conn:
            if cap is None:
                conn.execute("DELETE FROM budget_caps WHERE period = ?", (period,))
            else:
                conn.execute(
                    "INSERT INTO budget_caps (period, amount_usd) VALUES (?, ?)"
                    " ON CONFLICT (period) DO UPDATE SET amount_usd = excluded.amount_usd",
                    (period, f"{cap:f}"),
                )

    def caps(self) -> dict[Period, Decimal | None]:
        """The stored caps, ``{"day": ..., "week": ...}``; ``None`` where none is set."""
        with self._read() as conn:
            return _caps(conn)

    def snapshot(self, now: dt.datetime | None = None) -> BudgetSnapshot:
        """Spent and reserved against the lowest cap in force in the day and week holding ``now``."""
        with self._read() as conn:
            return _usage(conn, _Clock.at(now), self.config_caps)


# --- queries (the caller holds the lock, and the write transaction where it must be atomic) -----------------


def _new_row(
    job_id: str,
    attempt: int,
    provider: str,
    instance_id: str | None,
    gpu: str,
    rate_usd_per_hour: Decimal,
    started_at: dt.datetime,
    ended_at: dt.datetime | None,
    actual_usd: Decimal | None,
    status: str,
    name: str | None,
    message: str | None,
    now: dt.datetime | None,
) -> LedgerRow:
    """A checked row with nothing reserved yet (the caller fills that in under the write lock)."""
    if not status:
        raise ValueError("status must be a non-empty string")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
    return LedgerRow(
        job_id=job_id,
        attempt=attempt,
        name=name,
        provider=provider,
        instance_id=instance_id,
        gpu=gpu,
        rate_usd_per_hour=check_usd(rate_usd_per_hour, "rate_usd_per_hour"),
        started_at=require_aware(started_at, "started_at"),
        ended_at=None if ended_at is None else require_aware(ended_at, "ended_at"),
        reserved_usd=Decimal(0),
        actual_usd=None if actual_usd is None else check_usd(actual_usd, "actual_usd"),
        status=status,
        message=message,
        recorded_at=_Clock.at(now).moment,
    )


def _insert_and_read_back(conn: sqlite3.Connection, row: LedgerRow) -> LedgerRow:
    insert_row(conn, row)
    # Read back: the first and every later call then return equal rows (UTC times, stored Decimals).
    stored = find_row(conn, row.job_id, row.attempt)
    assert stored is not None
    return stored


def _caps(conn: sqlite3.Connection) -> dict[Period, Decimal | None]:
    found = dict(conn.execute("SELECT period, amount_usd FROM budget_caps").fetchall())
    return {period: (Decimal(found[period]) if period in found else None) for period in PERIODS}


def _usage(conn: sqlite3.Connection, clock: _Clock, config_caps: tuple[Cap, ...]) -> BudgetSnapshot:
    stored = [Cap(period, amount) for period, amount in _caps(conn).items() if amount is not None]
    # Lowest first; on a tie the stored cap, which holds for every folder, is the one named.
    caps = tuple(sorted((*stored, *config_caps), key=lambda cap: (PERIODS.index(cap.period), cap.amount)))

    def one(period: Period) -> CapUsage:
        start, end = clock.bounds(period)
        jobs: dict[str, list[LedgerRow]] = {}
        for row in select_rows(conn, since=start, until=end):
            jobs.setdefault(row.job_id, []).append(row)
        spent = sum((_job_spent(rows) for rows in jobs.values()), Decimal(0))
        amounts = conn.execute(
            "SELECT amount_usd FROM budget_reservations WHERE created_at >= ? AND created_at < ?",
            (to_db_time(start), to_db_time(end)),
        )
        reserved = sum((Decimal(amount) for (amount,) in amounts), Decimal(0))
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


def _reservation_row(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    found: sqlite3.Row | None = conn.execute(
        "SELECT job_id, name, provider, gpu, amount_usd, created_at FROM budget_reservations WHERE job_id = ?",
        (job_id,),
    ).fetchone()
    return found


def _open_reservations(conn: sqlite3.Connection) -> list[Reservation]:
    found = conn.execute(
        "SELECT job_id, name, provider, gpu, amount_usd, created_at FROM budget_reservations"
        " ORDER BY created_at, job_id"
    ).fetchall()
    return [_reservation(row) for row in found]


def _reservation(row: sqlite3.Row) -> Reservation:
    return Reservation(
        row["job_id"],
        Decimal(row["amount_usd"]),
        from_db_time(row["created_at"]),
        name=row["name"],
        provider=row["provider"],
        gpu=row["gpu"],
    )
