"""When a running job stops (:class:`Limits`), as pure code: the cap, the maximum duration and a cancel decide when
the agent is asked to stop, and when the instance must be ended through the provider's API whatever the agent
says. The cap runs on a :class:`~burst_jupyter.meter.Meter` and its injected clock, so a test decides with a clock
of its own and waits no real time; what is kept back at the budget stop is here.

Example:
    >>> from decimal import Decimal
    >>> class Fixed:
    ...     def __init__(self, now: float) -> None: self.now = now
    ...     def time(self) -> float: return self.now
    ...     def monotonic(self) -> float: return self.now
    >>> clock = Fixed(1000.0)
    >>> limits = Limits(meter=Meter(rate=Decimal(3600), cap=Decimal(30), since=1000.0, clock=clock),
    ...                 first_launch=1000.0, max_seconds=600.0, teardown_seconds=1.0)
    >>> limits.reserve_seconds(), limits.seconds_left(), limits.should_stop(cancelled=False)
    (4.0, 26.0, None)
    >>> clock.now = 1026.0
    >>> limits.should_stop(cancelled=False), limits.must_end(StopState())
    ('budget', None)
"""

from __future__ import annotations

from dataclasses import dataclass

from .agent import Reason
from .meter import Meter

__all__ = ["STOP_GRACE_SECONDS", "STOP_TEXT", "TICK_SECONDS", "Limits", "StopState", "terminate_reserve"]

# A stop the agent has not confirmed (its "stopping" note or the exit record) within this many seconds becomes a
# terminate through the provider's API: a frozen instance or agent never answers. A budget stop has less: the
# money left after its stop point (``_STOPPING_SECONDS``) ends it first.
STOP_GRACE_SECONDS = 5.0
# Kept back at the budget stop beyond the provider's terminate: the agent's answer to the stop, and the results'
# way back. Past it the instance is ended through the provider's API, results or not (:meth:`Limits.must_end`).
_STOPPING_SECONDS = 2.0
TICK_SECONDS = 0.25  # how often the stream loop (and a reaper waiting on an agent) looks at the cap and the rest


def terminate_reserve(teardown_seconds: float) -> float:
    """Seconds of money that buy only the provider's terminate, for a check made every tick (it may come one late):
    past it the instance is ended through the API, by the job and by its reaper alike."""
    return teardown_seconds + 2 * TICK_SECONDS

STOP_TEXT = {
    Reason.CANCELLED: "cancelled",
    Reason.BUDGET: "reached its cost cap",
    Reason.DEADLINE: "reached its maximum duration",
    Reason.LEASE: "the agent's lease lapsed (the client went silent)",
    Reason.AGENT_DIED: "the agent on the instance died",
    Reason.IDLE: "ran no cell for its idle limit",
}


@dataclass(frozen=True)
class StopState:
    """Where a stop stands, for :meth:`Limits.must_end` (monotonic seconds: these are waits, not money)."""

    sent: float | None = None  # when this client sent its stop (its grace counts from here)
    confirmed: bool = False  # the agent said it is stopping, or the cell ended
    cancel_by: float | None = None  # a cancel that came while stopping ends the instance by then


@dataclass(frozen=True)
class Limits:
    """A job's limits at one moment: its money (the meter, on the injected clock), its maximum duration counted from
    its first create request, and what a stop keeps back. Each answer reads the clock once, and nothing else."""

    meter: Meter  # the job's money now: earlier attempts, and the current machine's rate since its create request
    first_launch: float | None  # wall-clock seconds of the job's first create request (None before it)
    max_seconds: float
    teardown_seconds: float  # the provider's terminate
    sync_up_seconds: float = 0.0  # the last upload's time: the results' way back takes about as long
    idle_until: float | None = None  # a kept machine with no cell running: wall-clock seconds its idle limit ends

    def reserve_seconds(self) -> float:
        """Kept back at the budget stop so the whole bill stays inside the cap: the agent's answer and the results
        (at least the upload's time), then the provider's terminate (:meth:`must_end` holds that last part)."""
        return self.teardown_seconds + max(self.sync_up_seconds, 1.0) + _STOPPING_SECONDS

    def _elapsed(self) -> float | None:
        return None if self.first_launch is None else self.meter.clock.time() - self.first_launch

    def should_stop(self, *, cancelled: bool) -> str | None:
        """Why the agent should be asked to stop the job now (None: not yet)."""
        if cancelled:
            return Reason.CANCELLED
        elapsed = self._elapsed()
        if elapsed is not None and elapsed > self.max_seconds:
            return Reason.DEADLINE
        if self.meter.exhausted(reserve=self.reserve_seconds()):
            return Reason.BUDGET
        if self.idle_until is not None and self.meter.clock.time() >= self.idle_until:
            return Reason.IDLE
        return None

    def out_of_time_or_money(self, *, cancelled: bool) -> str | None:
        """"budget" or "deadline" when either is why the job should stop now (None: not, or a cancel is)."""
        reason = self.should_stop(cancelled=cancelled)
        return reason if reason in (Reason.BUDGET, Reason.DEADLINE) else None

    def must_end(self, stop: StopState) -> str | None:
        """Why the instance must be ended through the provider's API now, whatever the agent says (None: not yet):
        the money left buys only the terminate; the maximum duration is over by more than a stop takes; a stop the
        agent never confirmed; a cancel's last chance is over. Checked after a stop and while results come back,
        so a first stop never switches the limits off."""
        if self.meter.exhausted(reserve=terminate_reserve(self.teardown_seconds)):
            return Reason.BUDGET
        elapsed = self._elapsed()
        if elapsed is not None and elapsed > self.max_seconds + self.reserve_seconds():
            return Reason.DEADLINE
        now = self.meter.clock.monotonic()
        if stop.sent is not None and not stop.confirmed and now - stop.sent > STOP_GRACE_SECONDS:
            return "unconfirmed"
        if stop.cancel_by is not None and now > stop.cancel_by:
            return Reason.CANCELLED
        return None

    def seconds_left(self) -> float | None:
        """Seconds until the cap (less the teardown's share) or the maximum duration stops the job; None: never."""
        left: list[float] = []
        elapsed = self._elapsed()
        if elapsed is not None:
            left.append(self.max_seconds - elapsed)
        if self.meter.since is not None:
            money = self.meter.seconds_left(reserve=self.reserve_seconds())
            if money is not None:
                left.append(money)
        return max(min(left), 0.0) if left else None

