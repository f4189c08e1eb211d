"""This machine's processes, as the client tells a live one from a gone one: a kernel that owns a job, a reaper, the
writer of a scratch file. (The agent has its own ``pid_alive``: it runs alone on the instance, importing nothing.)"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pid_alive", "process_start"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: alive
    return True


def process_start(pid: int) -> str | None:
    """The kernel's boot-relative start time of ``pid`` (Linux), to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]
