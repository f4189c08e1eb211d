"""The cells run on a kept machine (``%burst up``), each with its share of the machine's bill.

A kept machine is billed on its own ledger row (it holds one reservation, against the daily and weekly caps, and
settles at ``%burst down``). Its cells are recorded here, append-only like the ledger: when each ran, how much
output it sent, and its share (the machine's rate over the cell's time). Shares are information: they are part of
the machine's row, never added to the spend a second time. Their table is the ledger's schema version 3 (ledger.py).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass
from decimal import Decimal

from .ledger import check_usd, from_db_time, require_aware, to_db_time

__all__ = ["CellRow", "insert_cell", "select_cells"]

@dataclass(frozen=True, slots=True)
class CellRow:
    """One cell on a kept machine: its time there, its output (bytes of stdout, stderr and displays) and its share
    of the machine's bill."""

    machine_job_id: str
    cell_job_id: str
    name: str | None
    started_at: dt.datetime
    ended_at: dt.datetime
    output_bytes: int
    share_usd: Decimal
    status: str

    def __post_init__(self) -> None:
        require_aware(self.started_at, "started_at")
        require_aware(self.ended_at, "ended_at")
        check_usd(self.share_usd, "share_usd")

    @property
    def duration(self) -> dt.timedelta:
        return self.ended_at - self.started_at


def insert_cell(conn: sqlite3.Connection, cell: CellRow) -> None:
    """Append ``cell`` (the caller holds the write transaction); a cell recorded already is left as it is."""
    conn.execute(
        "INSERT OR IGNORE INTO ledger_cells (machine_job_id, cell_job_id, name, started_at, ended_at, output_bytes,"
        " share_usd, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (cell.machine_job_id, cell.cell_job_id, cell.name, to_db_time(cell.started_at, "started_at"),
         to_db_time(cell.ended_at, "ended_at"), cell.output_bytes, f"{cell.share_usd:f}", cell.status),
    )


def select_cells(conn: sqlite3.Connection, machine_job_id: str | None = None) -> list[CellRow]:
    """Every recorded cell (or one machine's), in the order they ran."""
    where, params = ("WHERE machine_job_id = ?", (machine_job_id,)) if machine_job_id else ("", ())
    cursor = conn.execute(f"SELECT * FROM ledger_cells {where} ORDER BY started_at, seq", params)
    return [CellRow(machine_job_id=r["machine_job_id"], cell_job_id=r["cell_job_id"], name=r["name"],
                    started_at=from_db_time(r["started_at"]), ended_at=from_db_time(r["ended_at"]),
                    output_bytes=int(r["output_bytes"]), share_usd=Decimal(r["share_usd"]), status=r["status"])
            for r in cursor]
