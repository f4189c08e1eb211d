"""Reservations: money held for a job from before anything is rented until it settles, and their table.

A job reserves its worst case before launch (:meth:`Budget.reserve <burst_jupyter.budget.Budget.reserve>`); each
attempt that ends early takes its cost out of the reservation, and settling drops it. The functions here are the
table's queries; the caller holds the budget's lock, and the write transaction where it must be atomic.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import KW_ONLY, dataclass
from decimal import Decimal

from .ledger import from_db_time, to_db_time

__all__ = [
    "Reservation",
    "drop_reservation",
    "find_reservation",
    "insert_reservation",
    "open_reservations",
    "reserved_between",
    "set_reservation_amount",
]

_COLUMNS = "job_id, name, provider, gpu, amount_usd, created_at"


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


def insert_reservation(conn: sqlite3.Connection, reservation: Reservation) -> None:
    conn.execute(
        f"INSERT INTO budget_reservations ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
        (
            reservation.job_id,
            reservation.name,
            reservation.provider,
            reservation.gpu,
            f"{reservation.amount:f}",
            to_db_time(reservation.created_at),
        ),
    )


def find_reservation(conn: sqlite3.Connection, job_id: str) -> Reservation | None:
    found: sqlite3.Row | None = conn.execute(
        f"SELECT {_COLUMNS} FROM budget_reservations WHERE job_id = ?", (job_id,)
    ).fetchone()
    return None if found is None else _reservation(found)


def open_reservations(conn: sqlite3.Connection) -> list[Reservation]:
    """Every reservation not yet settled or released, oldest first (``warnings`` empty)."""
    found = conn.execute(f"SELECT {_COLUMNS} FROM budget_reservations ORDER BY created_at, job_id").fetchall()
    return [_reservation(row) for row in found]


def reserved_between(conn: sqlite3.Connection, start: dt.datetime, end: dt.datetime) -> Decimal:
    """What the reservations created in ``[start, end)`` hold."""
    amounts = conn.execute(
        "SELECT amount_usd FROM budget_reservations WHERE created_at >= ? AND created_at < ?",
        (to_db_time(start), to_db_time(end)),
    )
    return sum((Decimal(amount) for (amount,) in amounts), Decimal(0))


def set_reservation_amount(conn: sqlite3.Connection, job_id: str, amount: Decimal) -> None:
    conn.execute("UPDATE budget_reservations SET amount_usd = ? WHERE job_id = ?", (f"{amount:f}", job_id))


def drop_reservation(conn: sqlite3.Connection, job_id: str) -> None:
    """Idempotent: nothing happens when ``job_id`` holds nothing."""
    conn.execute("DELETE FROM budget_reservations WHERE job_id = ?", (job_id,))


def _reservation(row: sqlite3.Row) -> Reservation:
    return Reservation(
        row["job_id"],
        Decimal(row["amount_usd"]),
        from_db_time(row["created_at"]),
        name=row["name"],
        provider=row["provider"],
        gpu=row["gpu"],
    )
