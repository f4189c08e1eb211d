"""The append-only ledger: a row per attempt of each job that rented something, its schema, the money/time codecs.

A job has one attempt unless its instance was lost (a spot preemption, a failed boot) and it was retried on
another: then each attempt that ended early has its own row, and the last attempt's row is the job's final one.

Money is ``Decimal`` and is stored in TEXT columns (plain notation, never REAL), so sums are exact; SQLite never
adds money up, Python does. Times are stored as UTC ISO-8601 TEXT of one fixed width, so text order is time order
and range queries can use an index. The ledger table refuses UPDATE and DELETE by trigger: a row, once written,
is the record of what was spent.

The tables share the one SQLite file with the state store, so every name starts with ``budget_`` or
``ledger_``.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass
from decimal import Decimal

from ..db import write_transaction
from ..errors import BurstError
from ..money import format_usd

__all__ = [
    "SCHEMA_VERSION",
    "LedgerRow",
    "check_usd",
    "ensure_schema",
    "find_row",
    "format_usd",
    "from_db_time",
    "insert_row",
    "require_aware",
    "select_rows",
    "to_db_time",
]

_CENT = Decimal("0.01")

# Each entry moves the schema from the previous version to its own. Append new versions; never edit old ones
# (files written by older releases replay only what they lack).
_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE ledger_rows (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                job_id TEXT NOT NULL UNIQUE,
                name TEXT,
                provider TEXT NOT NULL,
                instance_id TEXT,
                gpu TEXT NOT NULL,
                rate_usd_per_hour TEXT NOT NULL,
                started_at TEXT NOT NULL,
                ended_at TEXT,
                reserved_usd TEXT NOT NULL,
                actual_usd TEXT,
                status TEXT NOT NULL,
                message TEXT,
                recorded_at TEXT NOT NULL
            )""",
            "CREATE INDEX ledger_rows_started_at ON ledger_rows (started_at)",
            """CREATE TRIGGER ledger_rows_no_update BEFORE UPDATE ON ledger_rows
               BEGIN SELECT RAISE(ABORT, 'ledger_rows is append-only: UPDATE refused'); END""",
            """CREATE TRIGGER ledger_rows_no_delete BEFORE DELETE ON ledger_rows
               BEGIN SELECT RAISE(ABORT, 'ledger_rows is append-only: DELETE refused'); END""",
            """CREATE TABLE budget_reservations (
                job_id TEXT PRIMARY KEY,
                name TEXT,
                provider TEXT NOT NULL,
                gpu TEXT NOT NULL,
                amount_usd TEXT NOT NULL,
                created_at TEXT NOT NULL
            )""",
            "CREATE INDEX budget_reservations_created_at ON budget_reservations (created_at)",
            """CREATE TABLE budget_caps (
                period TEXT PRIMARY KEY CHECK (period IN ('day', 'week')),
                amount_usd TEXT NOT NULL
            )""",
        ),
    ),
    (
        2,
        (
            # One row per (job, attempt): a job retried after a preemption records every instance it paid for.
            # SQLite cannot change a UNIQUE constraint in place, so the table is rebuilt (seq values kept, so the
            # AUTOINCREMENT sequence goes on from them); dropping the old table drops its index and triggers.
            """CREATE TABLE ledger_rows_v2 (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                job_id TEXT NOT NULL,
                attempt INTEGER NOT NULL DEFAULT 1 CHECK (attempt >= 1),
                name TEXT,
                provider TEXT NOT NULL,
                instance_id TEXT,
                gpu TEXT NOT NULL,
                rate_usd_per_hour TEXT NOT NULL,
                started_at TEXT NOT NULL,
                ended_at TEXT,
                reserved_usd TEXT NOT NULL,
                actual_usd TEXT,
                status TEXT NOT NULL,
                message TEXT,
                recorded_at TEXT NOT NULL,
                UNIQUE (job_id, attempt)
            )""",
            """INSERT INTO ledger_rows_v2 (seq, job_id, name, provider, instance_id, gpu, rate_usd_per_hour,
                   started_at, ended_at, reserved_usd, actual_usd, status, message, recorded_at)
               SELECT seq, job_id, name, provider, instance_id, gpu, rate_usd_per_hour, started_at, ended_at,
                   reserved_usd, actual_usd, status, message, recorded_at
               FROM ledger_rows""",
            "DROP TABLE ledger_rows",  # its implied DELETE fires no trigger
            "ALTER TABLE ledger_rows_v2 RENAME TO ledger_rows",
            "CREATE INDEX ledger_rows_started_at ON ledger_rows (started_at)",
            """CREATE TRIGGER ledger_rows_no_update BEFORE UPDATE ON ledger_rows
               BEGIN SELECT RAISE(ABORT, 'ledger_rows is append-only: UPDATE refused'); END""",
            """CREATE TRIGGER ledger_rows_no_delete BEFORE DELETE ON ledger_rows
               BEGIN SELECT RAISE(ABORT, 'ledger_rows is append-only: DELETE refused'); END""",
        ),
    ),
    (
        3,
        (
            # The cells run on a kept machine (%burst up), each with its share of the machine's row (budget/cells.py).
            """CREATE TABLE ledger_cells (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                machine_job_id TEXT NOT NULL,
                cell_job_id TEXT NOT NULL UNIQUE,
                name TEXT,
                started_at TEXT NOT NULL,
                ended_at TEXT NOT NULL,
                output_bytes INTEGER NOT NULL CHECK (output_bytes >= 0),
                share_usd TEXT NOT NULL,
                status TEXT NOT NULL
            )""",
            "CREATE INDEX ledger_cells_machine ON ledger_cells (machine_job_id)",
            """CREATE TRIGGER ledger_cells_no_update BEFORE UPDATE ON ledger_cells
               BEGIN SELECT RAISE(ABORT, 'ledger_cells is append-only: UPDATE refused'); END""",
            """CREATE TRIGGER ledger_cells_no_delete BEFORE DELETE ON ledger_cells
               BEGIN SELECT RAISE(ABORT, 'ledger_cells is append-only: DELETE refused'); END""",
        ),
    ),
)

SCHEMA_VERSION = _MIGRATIONS[-1][0]


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Bring the budget tables up to :data:`SCHEMA_VERSION`; a no-op when they are there already.

    Safe to call from many processes at once: the check is repeated under ``BEGIN IMMEDIATE``, so exactly one
    of them migrates. Raises :class:`BurstError` for a file written by a newer burst-jupyter.
    """
    # Fast path without the write lock: every Budget() in every kernel calls this.
    if _schema_version(conn) == SCHEMA_VERSION:
        return
    with write_transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS budget_schema_version ("
            " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
        )
        current = _schema_version(conn) or 0
        if current > SCHEMA_VERSION:
            raise BurstError(
                f"the budget tables in this file are version {current}, this burst-jupyter knows up to "
                f"{SCHEMA_VERSION}: upgrade burst-jupyter"
            )
        for version, statements in _MIGRATIONS:
            if version > current:
                for statement in statements:
                    conn.execute(statement)
        conn.execute(
            "INSERT INTO budget_schema_version (id, version) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (SCHEMA_VERSION,),
        )


def _schema_version(conn: sqlite3.Connection) -> int | None:
    try:
        found = conn.execute("SELECT version FROM budget_schema_version WHERE id = 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # a file no Budget has opened yet
            return None
        raise
    return None if found is None else int(found[0])


# --- money -----------------------------------------------------------------------------------------------


def check_usd(value: Decimal, what: str) -> Decimal:
    """``value`` as a ``Decimal`` if it is a finite amount >= 0 (an ``int`` is converted), else ``ValueError``.

    Floats raise ``TypeError``: a float has already lost the cents, so it is never converted.
    """
    if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
        raise TypeError(f"{what} must be a decimal.Decimal, not {type(value).__name__} (try Decimal('{value}'))")
    amount = Decimal(value)
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{what} must be a finite amount >= 0, got {value}")
    return amount


def _db_usd(amount: Decimal) -> str:
    return f"{amount:f}"  # plain notation: Decimal("1E+1") is stored as "10"


# --- time ------------------------------------------------------------------------------------------------


def require_aware(moment: dt.datetime, what: str) -> dt.datetime:
    """``moment`` if it carries a UTC offset; a naive one raises ``ValueError``.

    Whose midnight a naive time means is exactly what the day and week periods depend on, so it is not guessed.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {moment!r}")
    return moment


def to_db_time(moment: dt.datetime, what: str = "time") -> str:
    """UTC ISO-8601 with microseconds: fixed width, so text comparison in SQL is time comparison.

    Naive datetimes are refused (see :func:`require_aware`).
    """
    return require_aware(moment, what).astimezone(dt.timezone.utc).isoformat(timespec="microseconds")


def from_db_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# --- rows ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerRow:
    """What one attempt of a job cost. Times are UTC-aware; ``actual_usd`` is ``None`` when the cost is unknown
    (never $0).

    ``attempt`` counts from 1; a job has rows for attempts 1..n when its first n - 1 instances were lost.
    ``reserved_usd`` is the part of the job's reservation this row took (``Decimal(0)`` when nothing was held):
    for an attempt that ended early, as much of its known cost as was still held; for the final row, all that
    was still held. So a job's rows add up to what the budget held for it before it ran.
    """

    job_id: str
    attempt: int = 1
    name: str | None
    provider: str
    instance_id: str | None
    gpu: str
    rate_usd_per_hour: Decimal
    started_at: dt.datetime
    ended_at: dt.datetime | None
    reserved_usd: Decimal
    actual_usd: Decimal | None
    status: str
    message: str | None
    recorded_at: dt.datetime

    @property
    def duration(self) -> dt.timedelta | None:
        """``ended_at - started_at``; ``None`` while the end is unknown."""
        return None if self.ended_at is None else self.ended_at - self.started_at


_ROW_COLUMNS = (
    "job_id, attempt, name, provider, instance_id, gpu, rate_usd_per_hour, started_at, ended_at, reserved_usd,"
    " actual_usd, status, message, recorded_at"
)


def insert_row(conn: sqlite3.Connection, row: LedgerRow) -> None:
    """Append ``row``. The caller holds the write transaction; a duplicate (job_id, attempt) raises
    IntegrityError."""
    conn.execute(
        f"INSERT INTO ledger_rows ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row.job_id,
            row.attempt,
            row.name,
            row.provider,
            row.instance_id,
            row.gpu,
            _db_usd(row.rate_usd_per_hour),
            to_db_time(row.started_at, "started_at"),
            None if row.ended_at is None else to_db_time(row.ended_at, "ended_at"),
            _db_usd(row.reserved_usd),
            None if row.actual_usd is None else _db_usd(row.actual_usd),
            row.status,
            row.message,
            to_db_time(row.recorded_at, "recorded_at"),
        ),
    )


def find_row(conn: sqlite3.Connection, job_id: str, attempt: int | None = None) -> LedgerRow | None:
    """The row of ``job_id``'s ``attempt``; with ``attempt=None``, that of its latest attempt."""
    if attempt is None:
        found = conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM ledger_rows WHERE job_id = ? ORDER BY attempt DESC LIMIT 1", (job_id,)
        ).fetchone()
    else:
        found = conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM ledger_rows WHERE job_id = ? AND attempt = ?", (job_id, attempt)
        ).fetchone()
    return None if found is None else _row_from_db(found)


def select_rows(
    conn: sqlite3.Connection, *, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> list[LedgerRow]:
    """Rows whose ``started_at`` is in ``[since, until)`` (either end open when ``None``), oldest first."""
    clauses, params = [], []
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(to_db_time(since, "since"))
    if until is not None:
        clauses.append("started_at < ?")
        params.append(to_db_time(until, "until"))
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    cursor = conn.execute(f"SELECT {_ROW_COLUMNS} FROM ledger_rows{where} ORDER BY started_at, attempt, seq", params)
    return [_row_from_db(found) for found in cursor]


def _row_from_db(found: sqlite3.Row) -> LedgerRow:
    ended_at, actual_usd = found["ended_at"], found["actual_usd"]
    return LedgerRow(
        job_id=found["job_id"],
        attempt=int(found["attempt"]),
        name=found["name"],
        provider=found["provider"],
        instance_id=found["instance_id"],
        gpu=found["gpu"],
        rate_usd_per_hour=Decimal(found["rate_usd_per_hour"]),
        started_at=from_db_time(found["started_at"]),
        ended_at=None if ended_at is None else from_db_time(ended_at),
        reserved_usd=Decimal(found["reserved_usd"]),
        actual_usd=None if actual_usd is None else Decimal(actual_usd),
        status=found["status"],
        message=found["message"],
        recorded_at=from_db_time(found["recorded_at"]),
    )
