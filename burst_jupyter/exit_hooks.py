"""Kernel exit: hand every job this process owns to a detached reaper, fast.

A graceful shutdown or restart gives atexit about 2.5 s before SIGTERM and then SIGKILL; ipykernel installs no
SIGTERM handler, so without ours SIGTERM runs no atexit at all. The hooks (atexit, SIGTERM/SIGHUP, and the
explicit ``burst.shutdown()`` / ``%burst shutdown``) do not sync in-line: they mark each job handed off, start the
reaper in a session of its own and record its pid beside each job in the state store.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Session

__all__ = ["ExitHooks", "hand_off"]

_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


def hand_off(session: Session, reason: str) -> list[str]:
    """Give every live job of ``session`` to one detached reaper. Returns the job ids handed over."""
    from .reaper import spawn_reaper

    jobs = [j for j in session.live_jobs() if not j.handed_off.is_set()]
    for job in jobs:
        job.handed_off.set()
        job.cancel_requested.set()
    # A cell on a kept machine owns no instance: its machine's job is handed over, and the cell ends with it.
    ours = {j.id for j in jobs if j.plan.on is None}
    # Also what this process recorded but no longer tracks in memory (a job whose handle was dropped).
    recorded = {o.job_id for o in session.state.owned_by(session.owner) if o.reaper_pid is None}
    ids = sorted(ours | recorded)
    if not ids:
        return []
    pid = spawn_reaper(ids, reason=reason)
    session.state.hand_to_reaper(ids, pid)
    return ids


class ExitHooks:
    """Installs the atexit and signal hooks once per process; ``uninstall`` undoes them (``%reload_ext``)."""

    def __init__(self, session: Callable[[], Session | None]) -> None:
        self._session = session
        self._previous: dict[int, Any] = {}
        self._done = threading.Lock()  # both atexit and a signal may fire: hand off once

    def install(self) -> None:
        atexit.register(self._at_exit)
        # Python only lets the main thread set handlers (the magic may run in a subshell thread).
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        atexit.unregister(self._at_exit)
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, previous)
        self._previous.clear()

    def run(self, reason: str) -> list[str]:
        if not self._done.acquire(blocking=False):
            return []
        try:
            session = self._session()
            return hand_off(session, reason) if session is not None else []
        finally:
            self._done.release()

    def _at_exit(self) -> None:
        self.run("kernel exit")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.run(f"signal {signal.Signals(signum).name}")
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            # Die the way the sender meant, with the default action.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
