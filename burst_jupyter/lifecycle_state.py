"""What a job's :class:`~burst_jupyter.lifecycle.Lifecycle` knows as it goes (:class:`LifecycleState`): the
injected parts, the chosen provider, offer and instance, the money so far, what the agent said; and the few helpers
every phase shares (its meter, the handoff a reaper works from, the agent client, a cancel check)."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING

from .agent import Reason
from .errors import RemoteError
from .handoff import Handoff
from .job import Job, JobPlan
from .keys import JobKey
from .meter import WALL_CLOCK, Clock, Meter
from .output import RemoteDisplay
from .providers.base import Instance, Offer, Provider
from .remote import AgentClient, Record
from .sync import MountPlan
from .sync_back import Received

if TYPE_CHECKING:
    from .budget import Budget
    from .connections import Connections
    from .state import Owner, StateStore

__all__ = ["LifecycleState", "StopRequested", "unsynced", "utc"]


class StopRequested(Exception):

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class LifecycleState:
    """The state of one job's lifecycle, shared by its phases (provisioning, the remote run, the teardown)."""

    job: Job
    budget: Budget
    state: StateStore
    connections: Connections
    owner: Owner
    reconnect_timeout: float = 300.0
    terminate_timeout: float = 120.0
    # filled as the job goes
    provider: Provider | None = None  # the chosen one
    instance: Instance | None = None
    offer: Offer | None = None
    cap: Decimal = Decimal(0)
    rate: Decimal = Decimal(0)
    spent: Decimal = Decimal(0)  # what earlier attempts cost (never booted, or preempted): billed on rows of their own
    key: JobKey | None = None
    clock: Clock = WALL_CLOCK  # what money and the maximum duration run on: the provider bills on the wall clock
    launched_at: float | None = None  # clock seconds, at the create request of the current attempt
    first_launch: float | None = None  # clock seconds, at the first create request: the job's duration counts from it
    attempt: int = 1  # instances rented so far for this job, counting the current one; one ledger row each
    retries_left: int = 0  # relaunches still allowed after a preemption (--retries)
    tried: set[str] = field(default_factory=set)  # PROVIDER:OFFER_ID already rented and lost
    recorded: bool = False  # the state store has this job's row (intent first, then one per attempt)
    started: bool = False
    stop_reason: str | None = None
    stop_sent: float | None = None  # monotonic, when this client sent its stop (its grace counts from here)
    stop_confirmed: bool = False  # the agent said it is stopping (or the cell ended)
    cancel_by: float | None = None  # monotonic: a cancel that came while stopping ends the instance by then
    remote_error: RemoteError | None = None
    setup_error: str | None = None
    exit_record: Record | None = None
    received: Received | None = None
    said: set[str] = field(default_factory=set)  # notes on results already shown in the job view
    shown: RemoteDisplay | None = None  # the cell's value, as the notebook would show it
    lost: str | None = None  # what never came back when the job had to end with its instance unreachable
    sync_up_seconds: float = 0.0
    # One results transfer at a time writes into the local rw folders: a --sync-every pull or the final results.
    sync_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def plan(self) -> JobPlan:
        return self.job.plan

    @property
    def chosen(self) -> Provider:
        assert self.provider is not None
        return self.provider

    @property
    def launched_wall(self) -> dt.datetime | None:
        """The current attempt's create request, for its ledger row."""
        return None if self.launched_at is None else utc(self.launched_at)

    def meter(self) -> Meter:
        return Meter(rate=self.rate, cap=self.cap, since=self.launched_at, spent=self.spent, clock=self.clock)

    def cost_so_far(self) -> Decimal:
        return self.meter().cost()

    def _check_cancel(self) -> None:
        if self.job.cancel_requested.is_set() or self.job.handed_off.is_set():
            raise StopRequested(Reason.CANCELLED)

    def _handoff(self) -> Handoff:
        # What bounds a reaper's wait on the agent: the cap, what earlier attempts spent, the maximum duration.
        return replace(self.plan.handoff, provider_config=self.plan.configs[self.chosen.name], max_cost_usd=self.cap,
                       spent_usd=self.spent, max_seconds=self.plan.max_seconds, first_launch=self.first_launch)

    def _billing_handoff(self, since: dt.datetime) -> Handoff:
        """The handoff with what the attempt bills, for a row that has no instance recorded yet: a kernel that
        dies during the create leaves cleanup only this, and an instance that was made bills from ``since``."""
        return replace(self._handoff(), rate=self.rate, attempt=self.attempt,
                       gpu=self.offer.gpu_model if self.offer else None, launched_at=since)

    def _client(self) -> AgentClient:
        assert self.instance is not None and self.instance.endpoint is not None
        return self.connections.agent(self.instance.endpoint, self.instance.python, self.instance.workdir)

    def _unsynced(self) -> str | None:
        return unsynced(self.plan.mounts, self.plan.spec.pull)


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def unsynced(mounts: list[MountPlan], pull: list[str]) -> str | None:
    """What a job loses when its results never come back: its rw mounts' changes and pulled variables."""
    parts = [f"changes in {m.mount.remote} (rw mount of {m.mount.local})" for m in mounts if m.rw]
    if pull:
        parts.append(f"variables {', '.join(pull)}")
    return ", ".join(parts) or None
