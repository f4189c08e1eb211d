"""When a running job stops (:class:`StopPolicy`): the cap, the maximum duration and a cancel decide when the agent
is asked to stop, and when the instance must be ended through the provider's API whatever the agent says. The cap
runs on a :class:`~burst_jupyter.meter.Meter`; what is kept back at the budget stop is here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from .agent import Reason
from .events import EventType
from .lifecycle_state import LifecycleState, StopRequested
from .money import format_usd

__all__ = ["STOP_GRACE_SECONDS", "STOP_TEXT", "TICK_SECONDS", "StopPolicy", "terminate_reserve"]

T = TypeVar("T")

# A stop the agent has not confirmed (its "stopping" note or the exit record) within this many seconds becomes a
# terminate through the provider's API: a frozen instance or agent never answers. A budget stop has less: the
# money left after its stop point (``_STOPPING_SECONDS``) ends it first.
STOP_GRACE_SECONDS = 5.0
# Kept back at the budget stop beyond the provider's terminate: the agent's answer to the stop, and the results'
# way back. Past it the instance is ended through the provider's API, results or not (``_must_end``).
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
}


class StopPolicy(LifecycleState):
    """The stop decisions, shared by provisioning (a boot that outlasts the money) and the remote run."""

    def _should_stop(self) -> str | None:
        """Why the agent should be asked to stop the job now (None: not yet)."""
        if self.job.cancel_requested.is_set():
            return Reason.CANCELLED
        if self.first_launch is not None and self.clock.time() - self.first_launch > self.plan.max_seconds:
            return Reason.DEADLINE
        if self.meter().exhausted(reserve=self._reserve_seconds()):
            return Reason.BUDGET
        return None

    def _must_end(self) -> str | None:
        """Why the instance must be ended through the provider's API now, whatever the agent says (None: not yet):
        the money left buys only the terminate; the maximum duration is over by more than a stop takes; a stop the
        agent never confirmed; a cancel's last chance is over. Checked after a stop and while results come back,
        so a first stop never switches the limits off."""
        if self.meter().exhausted(reserve=terminate_reserve(self.chosen.teardown_seconds)):
            return Reason.BUDGET
        if self.first_launch is not None and \
                self.clock.time() - self.first_launch > self.plan.max_seconds + self._reserve_seconds():
            return Reason.DEADLINE
        if self.stop_sent is not None and not self.stop_confirmed and self.exit_record is None \
                and self.clock.monotonic() - self.stop_sent > STOP_GRACE_SECONDS:
            return "unconfirmed"
        if self.cancel_by is not None and self.clock.monotonic() > self.cancel_by:
            return Reason.CANCELLED
        return None

    def _end_now(self, why: str) -> StopRequested:
        """The instance is ended through the provider (the teardown that follows): say why, and what is lost."""
        reason = self.stop_reason or (Reason.CANCELLED if why == "unconfirmed" else why)
        self.stop_reason = reason
        text = {Reason.BUDGET: f"the cap ({format_usd(self.cap)}) leaves only the terminate",
                Reason.DEADLINE: "the maximum duration is over",
                "unconfirmed": f"the agent did not confirm the stop within {STOP_GRACE_SECONDS:.0f} s",
                Reason.CANCELLED: "a cancel's last chance is over"}[why]
        self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {text}; ending the instance through "
                      f"{self.chosen.name}'s API\n")
        self.lost = self._unsynced() if self.received is None else self.received.missing()
        return StopRequested(reason)

    def _reserve_seconds(self) -> float:
        """Kept back at the budget stop so the whole bill stays inside the cap: the agent's answer and the results
        (at least the upload's time), then the provider's terminate (``_must_end`` holds that last part)."""
        return self.chosen.teardown_seconds + max(self.sync_up_seconds, 1.0) + _STOPPING_SECONDS

    def _seconds_left(self) -> float | None:
        """Seconds until the cap (less the teardown's share) or the maximum duration stops the job; None: never."""
        left: list[float] = []
        if self.first_launch is not None:
            left.append(self.plan.max_seconds - (self.clock.time() - self.first_launch))
        if self.launched_at is not None:
            money = self.meter().seconds_left(reserve=self._reserve_seconds())
            if money is not None:
                left.append(money)
        return max(min(left), 0.0) if left else None

    def _check_budget(self) -> None:
        """While nothing else checks it (booting, unreachable): the cap and the maximum duration stop the job."""
        reason = self._should_stop()
        if reason in (Reason.BUDGET, Reason.DEADLINE):
            raise StopRequested(reason)

    async def _within_budget(self, call: Callable[[], T]) -> T:
        """A blocking call (an SSH handshake may hang for its whole timeout) that the cap or the maximum
        duration may cut short: the instance bills meanwhile, so we stop waiting for it when they say stop."""
        left = self._seconds_left()
        work = asyncio.to_thread(call)
        if left is None:
            return await work
        try:
            return await asyncio.wait_for(work, timeout=left + 0.05)
        except asyncio.TimeoutError:
            # The thread finishes on its own; the teardown that follows ends the instance under it.
            raise StopRequested(self._should_stop() or Reason.BUDGET) from None
