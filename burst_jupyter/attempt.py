"""One attempt at a job (:class:`Attempt`): one machine rented for it, and what that machine's agent said. A
relaunch after a preemption (or an offer that never booted) gets a new Attempt: nothing is reset by hand.

:meth:`Attempt.take` follows the agent's record stream as pure code: a record in, what the job view is told out
(:class:`Notice`), the attempt's state updated on the way. The stream loop (remote_run.py) does the telling.

Example:
    >>> attempt = Attempt()
    >>> [n.type.value for n in attempt.take({"k": "started"})], attempt.started
    (['started'], True)
    >>> attempt.take({"k": "note", "m": "stopping: budget"})[0].fields
    {'message': 'reached its cost cap'}
    >>> attempt.stop_reason, attempt.stop.confirmed
    ('budget', True)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .agent import STOPPING, Kind, Reason
from .errors import RemoteError
from .events import EventType
from .output import RemoteDisplay
from .remote import Record
from .stop_policy import STOP_TEXT, StopState
from .sync_back import Received

__all__ = ["Attempt", "Notice", "agent_died"]


@dataclass(frozen=True)
class Notice:
    """What a record tells the job view: an event, or (``EventType.OUTPUT``) the cell's own output."""

    type: EventType
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Attempt:
    """The current attempt: its number (one ledger row each) and what its agent said and was asked."""

    number: int = 1  # instances rented so far for this job, counting this one
    started: bool = False
    stop_reason: str | None = None
    stop: StopState = field(default_factory=StopState)
    remote_error: RemoteError | None = None
    setup_error: str | None = None
    exit_record: Record | None = None
    received: Received | None = None
    shown: RemoteDisplay | None = None  # the cell's value, as the notebook would show it

    def next(self) -> Attempt:
        """The attempt after this one: the relaunch runs the job from the start."""
        return Attempt(number=self.number + 1)

    @property
    def exit_reason(self) -> str | None:
        """Why the agent says the cell ended (its exit record), if it said."""
        reason = (self.exit_record or {}).get("reason")
        return None if reason is None else str(reason)

    def take(self, r: Record) -> list[Notice]:
        """Follow one record of the agent's stream: update this attempt, and say what the job view is told."""
        k = r.get("k")
        if k == Kind.OUT:  # the instance's data, shown inert: a stream of the two, text bounded by the job
            return [Notice(EventType.OUTPUT, {"stream": "stderr" if r.get("s") == "stderr" else "stdout",
                                              "text": str(r.get("d", ""))})]
        if k == Kind.DISPLAY and isinstance(r.get("data"), dict):  # inert from here on
            return [Notice(EventType.DISPLAY, {"data": RemoteDisplay(r["data"]).bundle()})]
        if k == Kind.RESULT and isinstance(r.get("data"), dict):
            self.shown = RemoteDisplay(r["data"])
        elif k == Kind.PROGRESS:
            return [Notice(EventType.PROGRESS, {"percent": r.get("p"), "message": r.get("m")})]
        elif k == Kind.STARTED:
            self.started = True
            return [Notice(EventType.STARTED)]
        elif k == Kind.ERROR:
            self.remote_error = RemoteError(str(r.get("ename")), str(r.get("evalue", "")), list(r.get("tb") or []))
        elif k == Kind.SETUP_ERROR:
            self.setup_error = str(r.get("m"))
        elif k == Kind.NOTE and str(r.get("m", "")).startswith(STOPPING):
            self.stop = replace(self.stop, confirmed=True)
            if self.stop_reason is None:
                self.stop_reason = str(r["m"]).removeprefix(STOPPING)
                return [Notice(EventType.STOPPING, {"message": STOP_TEXT.get(self.stop_reason, self.stop_reason)})]
        elif k == Kind.EXIT:
            self.exit_record = r
            self.stop = replace(self.stop, confirmed=True)
            return [Notice(EventType.SYNCING_DOWN)]
        return []


    def machine_stopped(self, reason: str) -> None:
        """The kept machine this cell ran on was stopped for ``reason`` (its cap, its maximum duration) while the
        cell ran: that is how the cell ended. The KeyboardInterrupt or the death of the remote process it caused
        is the effect, not the cause."""
        self.stop_reason, self.remote_error = reason, None
        if self.exit_record is not None:
            self.exit_record = {**self.exit_record, "reason": reason}


def agent_died(r: Record) -> bool:
    """The record says the agent's container stopped under it: taken away (a preemption), or a crash."""
    return r.get("k") == Kind.EXIT and r.get("reason") == Reason.AGENT_DIED
