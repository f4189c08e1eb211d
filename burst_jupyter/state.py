"""The state store: every instance this install owns, recorded *before* it is created.

Two-phase: ``record_intent`` before the create call, ``record_launched`` with the instance id right after,
``mark_terminated`` only once the provider confirms it is gone. A row also carries a
:class:`~burst_jupyter.handoff.Handoff` (JSON): all a detached reaper needs to sync, terminate and settle the job
without the kernel that started it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .db import connect, write_transaction
from .processes import pid_alive, process_start

if TYPE_CHECKING:
    from .handoff import Handoff

__all__ = ["OwnedInstance", "Owner", "StateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    job_id          TEXT PRIMARY KEY,
    provider        TEXT NOT NULL,
    instance_id     TEXT,
    state           TEXT NOT NULL,      -- intent | launched | terminated | abandoned
    owner_host      TEXT NOT NULL,
    owner_pid       INTEGER NOT NULL,
    owner_started   TEXT,               -- process start token, guards against pid reuse
    reaper_pid      INTEGER,            -- set when a kernel handed the job to a reaper
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    handoff         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
"""

LIVE_STATES = ("intent", "launched")


@dataclass(frozen=True, slots=True)
class Owner:
    host: str
    pid: int
    started: str | None

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()))

    def is_alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # another machine's kernel: we cannot tell, so we never take its jobs
        if not pid_alive(self.pid):
            return False
        return self.started is None or process_start(self.pid) in (None, self.started)


@dataclass(frozen=True, slots=True)
class OwnedInstance:
    job_id: str
    provider: str
    instance_id: str | None
    state: str
    owner: Owner
    reaper_pid: int | None
    created_at: dt.datetime
    handoff: Handoff

    @property
    def orphaned(self) -> bool:
        """Live at the provider (as far as we know) while neither its kernel nor a reaper is alive."""
        if self.state not in LIVE_STATES:
            return False
        if self.reaper_pid is not None and pid_alive(self.reaper_pid):
            return False
        return not self.owner.is_alive()

    @property
    def rate_usd_per_hour(self) -> Decimal | None:
        """The current attempt's billed $/h as the job last recorded it; None before an instance was recorded."""
        return self.handoff.rate

    @property
    def billing_since(self) -> dt.datetime:
        """The current attempt's create request (the row's creation before the launch was recorded): what it has
        billed counts from here, never less."""
        return self.handoff.launched_at or self.created_at


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = connect(path)
        self._conn.executescript(_SCHEMA)
        # One connection, used from the session loop's worker threads, reapers and reconciliation at once:
        # SQLite refuses a second transaction on a connection that is inside one, so calls take turns.
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, write_transaction(self._conn) as c:
            yield c

    def _select(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def record_intent(self, job_id: str, provider: str, owner: Owner, handoff: Handoff) -> None:
        now = _now()
        with self._write() as c:
            c.execute(
                "INSERT INTO instances (job_id, provider, state, owner_host, owner_pid, owner_started,"
                " created_at, updated_at, handoff) VALUES (?, ?, 'intent', ?, ?, ?, ?, ?, ?)",
                (job_id, provider, owner.host, owner.pid, owner.started, now, now, json.dumps(handoff.to_json())),
            )

    def record_attempt(self, job_id: str, provider: str, handoff: Handoff) -> None:
        """A new launch attempt (the previous instance is confirmed gone): back to intent, maybe elsewhere."""
        with self._write() as c:
            c.execute(
                "UPDATE instances SET provider = ?, instance_id = NULL, state = 'intent', handoff = ?, updated_at = ?"
                " WHERE job_id = ?",
                (provider, json.dumps(handoff.to_json()), _now(), job_id),
            )

    def record_launched(self, job_id: str, instance_id: str, handoff: Handoff) -> None:
        with self._write() as c:
            c.execute(
                "UPDATE instances SET instance_id = ?, state = 'launched', handoff = ?, updated_at = ?"
                " WHERE job_id = ?",
                (instance_id, json.dumps(handoff.to_json()), _now(), job_id),
            )

    def update_handoff(self, job_id: str, **fields: Any) -> None:
        """Change these :class:`~burst_jupyter.handoff.Handoff` fields of the row's handoff, keeping the others."""
        from .handoff import Handoff

        with self._write() as c:
            row = c.execute("SELECT handoff FROM instances WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None:
                handoff = dataclasses.replace(Handoff.from_json(json.loads(row["handoff"])), **fields)
                c.execute("UPDATE instances SET handoff = ?, updated_at = ? WHERE job_id = ?",
                          (json.dumps(handoff.to_json()), _now(), job_id))

    def mark_terminated(self, job_id: str) -> None:
        self._set_state(job_id, "terminated")

    def mark_abandoned(self, job_id: str) -> None:
        """Nothing was ever created for this intent (the launch failed before the provider accepted it)."""
        self._set_state(job_id, "abandoned")

    def _set_state(self, job_id: str, state: str) -> None:
        with self._write() as c:
            c.execute("UPDATE instances SET state = ?, updated_at = ? WHERE job_id = ?", (state, _now(), job_id))

    def hand_to_reaper(self, job_ids: list[str], reaper_pid: int) -> None:
        with self._write() as c:
            c.executemany("UPDATE instances SET reaper_pid = ?, updated_at = ? WHERE job_id = ?",
                          [(reaper_pid, _now(), j) for j in job_ids])

    def get(self, job_id: str) -> OwnedInstance | None:
        rows = self._select("SELECT * FROM instances WHERE job_id = ?", (job_id,))
        return _row(rows[0]) if rows else None

    def live(self) -> list[OwnedInstance]:
        rows = self._select("SELECT * FROM instances WHERE state IN (?, ?) ORDER BY created_at", LIVE_STATES)
        return [_row(r) for r in rows]

    def owned_by(self, owner: Owner) -> list[OwnedInstance]:
        return [i for i in self.live() if i.owner == owner]

    def orphans(self) -> list[OwnedInstance]:
        return [i for i in self.live() if i.orphaned]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _row(row: Any) -> OwnedInstance:
    from .handoff import Handoff  # its provider parts are not needed at %load_ext, which imports this module

    return OwnedInstance(
        job_id=row["job_id"],
        provider=row["provider"],
        instance_id=row["instance_id"],
        state=row["state"],
        owner=Owner(row["owner_host"], row["owner_pid"], row["owner_started"]),
        reaper_pid=row["reaper_pid"],
        created_at=dt.datetime.fromisoformat(row["created_at"]),
        handoff=Handoff.from_json(json.loads(row["handoff"])),
    )
