"""The enforcer: caps, reservations and the ledger in one SQLite file, each change one transaction.

A job reserves its cap before launch; the check "spent + reserved + this job <= cap" and the insert happen
under one ``BEGIN IMMEDIATE``, so kernels racing for the last dollars cannot both win. Settling writes the
ledger row and drops the reservation in one transaction. A job retried on another instance first records each
attempt that ended early, each in one transaction that also takes its cost out of the job's reservation, so
what the job has spent plus what it still holds never passes what it reserved.

Which caps hold and what counts against them: :mod:`.caps`; the day and the week they count in: :mod:`.periods`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

from ..db import connect, write_transaction
from ..errors import BudgetExceededError
from .caps import BudgetSnapshot, Cap, read_snapshot, store_cap, stored_caps
from .cells import CellRow, insert_cell, select_cells
from .ledger import LedgerRow, check_usd, ensure_schema, find_row, insert_row, require_aware, select_rows
from .periods import PERIODS, Calendar, Period
from .reservations import (
    Reservation,
    drop_reservation,
    find_reservation,
    insert_reservation,
    open_reservations,
    set_reservation_amount,
)
from .table import LedgerTable

__all__ = ["Budget"]


class Budget:
    """Caps, reservations and the ledger in one SQLite file (shared with the state store).

    Safe to construct in many processes at once (schema creation is serialized), and to share between the
    threads of one process (one connection, used under a lock). ``config_caps`` hold for this object's
    reservations besides the stored ones (:mod:`.caps` says how caps combine).

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
        calendar = Calendar.at(now)
        held = Reservation(
            job_id, amount, calendar.moment.astimezone(dt.timezone.utc), name=name, provider=provider, gpu=gpu
        )
        with self._write() as conn:
            if find_reservation(conn, job_id) is not None:
                raise ValueError(f"job {job_id!r} already has a reservation")
            if find_row(conn, job_id) is not None:
                raise ValueError(f"job {job_id!r} is already settled in the ledger")
            before = read_snapshot(conn, calendar, self.config_caps)
            for cap_usage in before:
                refusal = cap_usage.refusal(amount)
                if refusal is not None:
                    raise BudgetExceededError(refusal)
            insert_reservation(conn, held)
        after = (replace(cap_usage, reserved=cap_usage.reserved + amount) for cap_usage in before)
        warnings = tuple(line for cap_usage in after if (line := cap_usage.warning_line) is not None)
        return replace(held, warnings=warnings)

    def release(self, job_id: str) -> None:
        """Drop ``job_id``'s reservation without a ledger row (nothing was rented). Idempotent."""
        with self._write() as conn:
            drop_reservation(conn, job_id)

    def open_reservations(self) -> list[Reservation]:
        """Reservations not yet settled or released, oldest first (``warnings`` empty)."""
        with self._read() as conn:
            return open_reservations(conn)

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
            held = find_reservation(conn, job_id)
            if held is not None:
                taken = Decimal(0) if row.actual_usd is None else min(row.actual_usd, held.amount)
                row = replace(row, reserved_usd=taken, name=row.name if row.name is not None else held.name)
                set_reservation_amount(conn, job_id, held.amount - taken)
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
                held = find_reservation(conn, job_id)
                if held is not None:
                    row = replace(row, reserved_usd=held.amount, name=row.name if row.name is not None else held.name)
                stored = _insert_and_read_back(conn, row)
            drop_reservation(conn, job_id)
        return stored

    def record_cell(self, cell: CellRow) -> None:
        """A cell that ran on a kept machine, with its share of that machine's row (recorded once per cell)."""
        with self._write() as conn:
            insert_cell(conn, cell)

    def cells(self, machine_job_id: str | None = None) -> list[CellRow]:
        """The cells kept machines ran (or one machine's), in the order they ran."""
        with self._read() as conn:
            return select_cells(conn, machine_job_id)

    def rows(self, *, since: dt.datetime | None = None) -> list[LedgerRow]:
        """Ledger rows, oldest ``started_at`` first; with ``since``, those that started at or after it."""
        with self._read() as conn:
            return select_rows(conn, since=since)

    def table(self, *, tz: dt.tzinfo | None = None) -> LedgerTable:
        """All rows and the open reservations as a :class:`LedgerTable` (times shown in ``tz``, the system's local
        zone by default)."""
        with self._read() as conn:
            rows, held, cells = select_rows(conn, since=None), open_reservations(conn), select_cells(conn)
        return LedgerTable(rows, reservations=held, cells=cells, tz=tz)

    # --- caps ---

    def set_cap(self, period: Period, usd: Decimal | None) -> None:
        """Set (``None``: remove) the cap for ``"day"`` or ``"week"``, for every process using this file."""
        if period not in PERIODS:
            raise ValueError(f"period must be one of {PERIODS}, got {period!r}")
        cap = None if usd is None else check_usd(usd, f"{period} cap")
        with self._write() as conn:
            store_cap(conn, period, cap)

    def caps(self) -> dict[Period, Decimal | None]:
        """The stored caps, ``{"day": ..., "week": ...}``; ``None`` where none is set."""
        with self._read() as conn:
            return stored_caps(conn)

    def snapshot(self, now: dt.datetime | None = None) -> BudgetSnapshot:
        """Spent and reserved against the lowest cap in force in the day and week holding ``now``."""
        with self._read() as conn:
            return read_snapshot(conn, Calendar.at(now), self.config_caps)


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
        recorded_at=Calendar.at(now).moment,
    )


def _insert_and_read_back(conn: sqlite3.Connection, row: LedgerRow) -> LedgerRow:
    insert_row(conn, row)
    # Read back: the first and every later call then return equal rows (UTC times, stored Decimals).
    stored = find_row(conn, row.job_id, row.attempt)
    assert stored is not None
    return stored
