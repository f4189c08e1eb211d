"""One machine (:class:`Machine`): an instance rented on one offer (or the user's own machine, on local and ssh),
with its billed rate and billing clock, the key it answers to, its agent's connection and its end (terminate,
confirm gone, settle its ledger row). A job rents one for each attempt (lifecycle.py) and ends it; the machine
knows nothing of the cell it runs, so one can outlive a job.

:class:`JobParts` are what the session injects: its install's shared parts (the budget, the state store, the
connection pool), who owns the work, and the clock money runs on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import NoCapacity, ProvisioningFailed
from .keys import JobKey
from .meter import WALL_CLOCK, Clock, Meter, utc
from .providers.base import BootWatch, Capability, Instance, Offer, Provider, terminate_confirmed
from .remote import AgentClient

if TYPE_CHECKING:
    from .budget import Budget
    from .connections import Connections
    from .parts import InstallParts
    from .spec import JobSpec
    from .state import Owner, StateStore

__all__ = ["JobParts", "Machine"]


@dataclass(frozen=True)
class JobParts:
    """What a job runs with, from its session: injected, never built here."""

    install: InstallParts
    owner: Owner
    clock: Clock = WALL_CLOCK  # what money and the maximum duration run on: the provider bills on the wall clock
    reconnect_timeout: float = 300.0
    terminate_timeout: float = 120.0

    @property
    def budget(self) -> Budget:
        return self.install.budget

    @property
    def state(self) -> StateStore:
        return self.install.state

    @property
    def connections(self) -> Connections:
        return self.install.connections


@dataclass
class Machine:
    """One machine, from the offer chosen to its confirmed end. ``row`` is the job whose state row and ledger
    reservation it bills on (today each job rents its own)."""

    provider: Provider
    offer: Offer
    parts: JobParts
    row: str
    key: JobKey | None = None  # the job's own SSH key (marketplaces): the instance is created to accept it
    rate: Decimal = field(init=False)  # $/h: as quoted by the offer, until the provider's billed rate is read back
    instance: Instance | None = None
    launched_at: float | None = None  # wall-clock seconds at the create request: the bill counts from it

    def __post_init__(self) -> None:
        self.rate = self.offer.price_usd_per_hour

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def rented(self) -> bool:
        """A marketplace's instance, billed from its create request (not the user's own machine)."""
        return Capability.RENTED in self.provider.capabilities

    @property
    def launched_wall(self) -> dt.datetime | None:
        """The create request, for the ledger row."""
        return None if self.launched_at is None else utc(self.launched_at)

    @property
    def running(self) -> Instance:
        assert self.instance is not None
        return self.instance

    def cost(self) -> Decimal:
        """What this machine has billed so far (rounded up, never under): nothing before its create request."""
        return self.meter(cap=Decimal(0), spent=Decimal(0)).attempt_cost()

    def meter(self, *, cap: Decimal, spent: Decimal) -> Meter:
        """A job's money with this machine billing now: ``spent`` by its earlier machines, against ``cap``."""
        return Meter(rate=self.rate, cap=cap, since=self.launched_at, spent=spent, clock=self.parts.clock)

    async def launch(self, spec: JobSpec, *, tag: str, at_create: Callable[[], BootWatch]) -> Instance:
        """The create request. The bill counts from here on the wall clock (``at_create`` is told, and gives the
        boot watchdog's terms); an offer taken meanwhile (:class:`NoCapacity`) made nothing and bills nothing."""
        self.launched_at = self.parts.clock.time()
        try:
            self.instance = await self.provider.launch(
                self.offer, spec, job_id=self.row, tag=tag,
                ssh_public_key=self.key.public_line if self.key else None, watch=at_create())
        except NoCapacity:
            self.launched_at = None
            raise
        return self.instance

    def pin_key(self) -> None:
        """Connect with the job's own key, pinning the host key the instance shows first (it is fresh)."""
        if self.key is not None and self.instance is not None and self.instance.endpoint is not None:
            endpoint = dataclasses.replace(self.instance.endpoint, key_path=str(self.key.private_path),
                                           known_hosts=str(self.key.known_hosts), trust_on_first_use=True)
            self.instance = dataclasses.replace(self.instance, endpoint=endpoint)

    def client(self) -> AgentClient:
        """The agent's client on this machine (one per job directory, shared with the provider)."""
        instance = self.running
        assert instance.endpoint is not None
        return self.parts.connections.agent(instance.endpoint, instance.python, instance.workdir)

    def handoff(self, attempt: int) -> dict[str, Any]:
        """The :class:`~burst_jupyter.handoff.Handoff` fields a reaper needs of this machine once its instance
        exists."""
        instance = self.running
        assert self.launched_wall is not None
        return {"instance_id": instance.instance_id, "workdir": instance.workdir, "python": instance.python,
                "endpoint": instance.endpoint, "rate": self.rate, "gpu": instance.gpu_model,
                "launched_at": self.launched_wall, "attempt": attempt}

    def billing(self, since: dt.datetime, attempt: int) -> dict[str, Any]:
        """The :class:`~burst_jupyter.handoff.Handoff` fields of what this machine bills, for a row that has no
        instance recorded yet: a kernel that dies during the create leaves cleanup only this, and an instance that
        was made bills from ``since``."""
        return {"rate": self.rate, "attempt": attempt, "gpu": self.offer.gpu_model, "launched_at": since}

    async def find_lost(self, tag: str) -> Instance | None:
        """The instance a create that failed without an answer may have made (its create request was sent)."""
        if not self.rented:
            return None  # local and ssh create nothing before launch returns
        found = [i for i in await self.provider.list_owned(tag) if i.job_id == self.row]
        self.instance = found[0] if found else None
        return self.instance

    async def terminate(self) -> BaseException | None:
        """Terminate and confirm gone (the state row says so once confirmed). Returns None, or the last problem."""
        problem = await terminate_confirmed(self.provider, self.running.instance_id,
                                            timeout=self.parts.terminate_timeout)
        if problem is None:
            await asyncio.to_thread(self.parts.state.mark_terminated, self.row)
        return problem

    async def end(self, *, attempt: int, status: str, why: str, name: str | None) -> Decimal:
        """Retire a machine the job can no longer use (never booted, preempted): confirmed gone and billed on a
        ledger row of its own, or :class:`ProvisioningFailed` (never two instances billing at once). Returns what
        it cost."""
        instance = self.running
        started = self.launched_wall
        assert started is not None
        problem = await self.terminate()
        if problem is not None:
            raise ProvisioningFailed(f"{self.name} instance {instance.instance_id} {why}, and could not "
                                     f"be confirmed gone: {problem}")
        cost = self.cost()
        if instance.endpoint is not None:
            await asyncio.to_thread(self.parts.connections.reset, instance.endpoint)
        if self.key is not None:
            # The host key pinned for that instance dies with it: a marketplace may hand its ip:port to the next one.
            self.key.known_hosts.unlink(missing_ok=True)
        await asyncio.to_thread(
            self.parts.budget.record_attempt, self.row, attempt=attempt, provider=self.name,
            instance_id=instance.instance_id, gpu=instance.gpu_model or "", rate_usd_per_hour=self.rate,
            started_at=started, ended_at=utc(self.parts.clock.time()), actual_usd=cost,
            status=status, name=name, message=why)
        self.instance, self.launched_at = None, None
        return cost

    async def settle(self, *, attempt: int, actual: Decimal | None, status: str, name: str | None,
                     message: str | None) -> None:
        """The last machine's ledger row, which settles the job's reservation."""
        started = self.launched_wall
        assert started is not None
        await asyncio.to_thread(
            self.parts.budget.settle, self.row, provider=self.name,
            instance_id=self.instance.instance_id if self.instance else "",
            gpu=(self.instance.gpu_model if self.instance else None) or self.offer.gpu_model or "",
            rate_usd_per_hour=self.rate, started_at=started, ended_at=utc(self.parts.clock.time()),
            attempt=attempt, actual_usd=actual, status=status, name=name, message=message)

    async def release(self) -> None:
        """Let go of the agent's connection (the instance is ended, or a reaper owns it)."""
        if self.instance is not None and self.instance.endpoint is not None:
            await asyncio.to_thread(lambda: self.client().release())
