"""SQLite connections shared by the state store and the ledger: WAL, a busy timeout, explicit transactions.

Several kernels, the CLI and reaper processes write the same file. WAL lets readers run beside one writer;
``BEGIN IMMEDIATE`` takes the write lock up front so check-then-insert (budget reservations) is atomic.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from .paths import tighten

__all__ = ["connect", "write_transaction"]

_BUSY_TIMEOUT_MS = 30_000


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on. The file is 0600 and
    so are its ``-wal`` and ``-shm`` (SQLite gives those the database file's mode when it makes them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Made 0600 only when it does not exist yet: opening and closing a file SQLite already has open in this
    # process drops every POSIX lock the process holds on it (SQLite's own warning, "How To Corrupt An SQLite
    # Database File", 2.2), and another process may then checkpoint and delete a WAL that holds our commits.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        tighten(companion)  # chmod only: no file is opened
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    _set_wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switching a brand-new file to WAL can fail at once with "database is locked" when several processes
    open it together: SQLite does not apply the busy timeout to that pragma. So retry it ourselves."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): one writer at a time across processes."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
