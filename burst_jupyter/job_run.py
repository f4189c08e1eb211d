"""One job's run as it goes (:class:`JobRun`), shared by its phases (provisioning.py, remote_run.py, teardown.py):
the job and its injected :class:`~burst_jupyter.machine.JobParts`, its money (the cap, what earlier machines cost),
the current :class:`~burst_jupyter.machine.Machine` and :class:`~burst_jupyter.attempt.Attempt`, and the few
helpers every phase shares (the limits now, the handoff a reaper works from, a cancel check, a stop through the
provider's API)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TypeVar

from .agent import Reason
from .attempt import Attempt
from .events import EventType
from .handoff import Handoff
from .job import Job, JobPlan
from .keys import JobKey
from .machine import JobParts, Machine
from .meter import Clock, Meter, utc
from .money import format_usd
from .providers.base import Provider
from .stop_policy import STOP_GRACE_SECONDS, Limits
from .sync import MountPlan

__all__ = ["JobRun", "StopRequested", "unsynced"]

T = TypeVar("T")


class StopRequested(Exception):

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class JobRun:
    """The state of one job's run. The machine and the attempt are replaced as the job moves on, never reset."""

    job: Job
    parts: JobParts
    cap: Decimal = Decimal(0)  # decided once the offer is chosen (job.decide_cap)
    spent: Decimal = Decimal(0)  # what earlier machines cost (never booted, or preempted): billed on rows of their own
    first_launch: float | None = None  # clock seconds, at the first create request: the job's duration counts from it
    machine: Machine | None = None  # the one chosen, renting, running or just ended
    attempt: Attempt = field(default_factory=Attempt)
    key: JobKey | None = None  # the job's own SSH key (marketplaces), for each machine it rents
    retries_left: int = 0  # relaunches still allowed after a preemption (--retries)
    tried: set[str] = field(default_factory=set)  # PROVIDER:OFFER_ID already rented and lost
    recorded: bool = False  # the state store has this job's row (intent first, then one per attempt)
    said: set[str] = field(default_factory=set)  # notes on results already shown in the job view
    lost: str | None = None  # what never came back when the job had to end with its instance unreachable
    sync_up_seconds: float = 0.0  # the last upload's time: the results' way back is kept at least as long
    # One results transfer at a time writes into the local rw folders: a --sync-every pull or the final results.
    sync_lock: threading.Lock = field(default_factory=threading.Lock)
    # A kept machine (%burst up): its idle limit, when its last cell ended (or it started), cells running on it now.
    idle_seconds: float | None = None
    last_activity: float | None = None
    cells_running: int = 0

    @property
    def plan(self) -> JobPlan:
        return self.job.plan

    @property
    def clock(self) -> Clock:
        return self.parts.clock

    @property
    def on(self) -> Machine:
        """The current machine (chosen, at least)."""
        assert self.machine is not None
        return self.machine

    @property
    def chosen(self) -> Provider:
        return self.on.provider

    def meter(self) -> Meter:
        if self.machine is None:
            return Meter(rate=Decimal(0), cap=self.cap, since=None, spent=self.spent, clock=self.clock)
        return self.machine.meter(cap=self.cap, spent=self.spent)

    def cost_so_far(self) -> Decimal:
        return self.meter().cost()

    def limits(self) -> Limits:
        """The job's limits now (pure decisions, on the injected clock)."""
        return Limits(meter=self.meter(), first_launch=self.first_launch, max_seconds=self.plan.max_seconds,
                      teardown_seconds=self.chosen.teardown_seconds, sync_up_seconds=self.sync_up_seconds,
                      idle_until=self.idle_until())

    def idle_until(self) -> float | None:
        """A kept machine with no cell running: when its idle limit ends (wall clock). None: no limit now."""
        if self.idle_seconds is None or self.cells_running or self.last_activity is None:
            return None
        return self.last_activity + self.idle_seconds

    def idle_text(self) -> str:
        """When a kept machine with no cell running goes down, as its view says it (local time)."""
        until = self.idle_until()
        if until is None:
            return "a cell is running"
        return f"idle: down at {dt.datetime.fromtimestamp(until):%H:%M:%S} unless a cell runs"

    def cell_started(self) -> None:
        self.cells_running += 1

    def cell_ended(self) -> None:
        self.cells_running -= 1
        self.last_activity = self.clock.time()

    def note(self, text: str) -> None:
        """One line of this client's own in the job's output."""
        self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {text}\n")

    def check_cancel(self) -> None:
        if self.job.cancel_requested.is_set() or self.job.handed_off.is_set():
            raise StopRequested(Reason.CANCELLED)

    def check_budget(self) -> None:
        """While nothing else checks it (booting, unreachable): the cap and the maximum duration stop the job."""
        reason = self.limits().out_of_time_or_money(cancelled=self.job.cancel_requested.is_set())
        if reason is not None:
            raise StopRequested(reason)

    async def within_budget(self, call: Callable[[], T]) -> T:
        """A blocking call (an SSH handshake may hang for its whole timeout) that the cap or the maximum
        duration may cut short: the instance bills meanwhile, so we stop waiting for it when they say stop."""
        left = self.limits().seconds_left()
        work = asyncio.to_thread(call)
        if left is None:
            return await work
        try:
            return await asyncio.wait_for(work, timeout=left + 0.05)
        except asyncio.TimeoutError:
            # The thread finishes on its own; the teardown that follows ends the instance under it.
            raise StopRequested(self.should_stop() or Reason.BUDGET) from None

    def should_stop(self) -> str | None:
        """Why the agent should be asked to stop the job now (None: not yet)."""
        return self.limits().should_stop(cancelled=self.job.cancel_requested.is_set())

    def end_now(self, why: str) -> StopRequested:
        """The instance is ended through the provider (the teardown that follows): say why, and what is lost."""
        attempt = self.attempt
        reason = attempt.stop_reason or (Reason.CANCELLED if why == "unconfirmed" else why)
        attempt.stop_reason = reason
        text = {Reason.BUDGET: f"the cap ({format_usd(self.cap)}) leaves only the terminate",
                Reason.DEADLINE: "the maximum duration is over",
                "unconfirmed": f"the agent did not confirm the stop within {STOP_GRACE_SECONDS:.0f} s",
                Reason.CANCELLED: "a cancel's last chance is over"}[why]
        self.note(f"{text}; ending the instance through {self.chosen.name}'s API")
        self.lost = self.unsynced() if attempt.received is None else attempt.received.missing()
        return StopRequested(reason)

    def handoff(self) -> Handoff:
        # What bounds a reaper's wait on the agent: the cap, what earlier attempts spent, the maximum duration.
        return replace(self.plan.handoff, provider_config=self.plan.configs[self.chosen.name], max_cost_usd=self.cap,
                       spent_usd=self.spent, max_seconds=self.plan.max_seconds, first_launch=self.first_launch)

    def billing_handoff(self, since: float) -> Handoff:
        """The handoff with what the machine bills, for a row that has no instance recorded yet."""
        return replace(self.handoff(), **self.on.billing(utc(since), self.attempt.number))

    def unsynced(self) -> str | None:
        return unsynced(self.plan.mounts, self.plan.spec.pull)


def unsynced(mounts: list[MountPlan], pull: list[str]) -> str | None:
    """What a job loses when its results never come back: its rw mounts' changes and pulled variables."""
    parts = [f"changes in {m.mount.remote} (rw mount of {m.mount.local})" for m in mounts if m.rw]
    if pull:
        parts.append(f"variables {', '.join(pull)}")
    return ", ".join(parts) or None
