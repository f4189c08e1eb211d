"""A job's lifecycle (:class:`Lifecycle`): one state machine on the session loop.

select offer -> reserve budget -> record intent -> launch -> record instance -> connect -> upload and start the
agent -> stream (lease, cost cap, deadline, cancel, reconnect, preemption, periodic pulls) -> results ->
terminate -> confirm gone -> settle. Each step emits a :class:`JobEvent`. The ``finally`` of the lifecycle is the
first of the four layers against a leaked instance: whatever happened, a launched instance is terminated,
confirmed gone and settled. A preempted instance is ended and billed as an attempt of its own, and with
``--retries`` the job relaunches on the next offer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import (
    BudgetKilled,
    BurstError,
    ConfigError,
    ConnectFailed,
    HostKeyError,
    NoCapacity,
    Preempted,
    ProviderError,
    ProvisioningFailed,
    RateLimited,
    RemoteError,
    RemoteSetupError,
    ResultsTooLarge,
    SyncError,
    UnsafeResults,
    VariableError,
    one_line,
)
from .events import EventType
from .job import Job, JobPlan, JobResult, JobStatus, check_cap
from .keys import JobKey, create_job_key, remove_job_key
from .meter import WALL_CLOCK, Clock, Meter
from .money import format_usd
from .output import RemoteDisplay
from .protection import dead_mans_switch, protection
from .providers.accounts import MARKETPLACES
from .providers.base import BootWatch, Instance, InstanceState, Offer, Provider, terminate_confirmed
from .providers.catalog import ANY, CATALOG
from .remote import AgentClient, AgentStream, Record
from .sync import MountPlan, write_bundle
from .sync_back import Received, receive_results
from .variables import PulledValues, unpack_pulled

if TYPE_CHECKING:
    from .budget import Budget
    from .connections import Connections
    from .state import Owner, StateStore

__all__ = ["STOP_GRACE_SECONDS", "Lifecycle", "unsynced"]

T = TypeVar("T")

_MAX_RECONNECTS = 20
_CANCEL_RECONNECT_SECONDS = 15.0
_MAX_LAUNCH_ATTEMPTS = 4  # offers tried in turn when one is taken or never boots
# Results this machine could not write (a full disk) stay on the kept instance; asked for again this often.
_REFETCH_SECONDS = 5.0
# A stop the agent has not confirmed (its "stopping" note or the exit record) within this many seconds becomes a
# terminate through the provider's API: a frozen instance or agent never answers. A budget stop has less: the
# money left after its stop point (``_STOPPING_SECONDS``) ends it first.
STOP_GRACE_SECONDS = 5.0
# Kept back at the budget stop beyond the provider's terminate: the agent's answer to the stop, and the results'
# way back. Past it the instance is ended through the provider's API, results or not (``_must_end``).
_STOPPING_SECONDS = 2.0
_TICK_SECONDS = 0.25  # how often the stream loop looks at the cap, the deadline and a cancel

_FINAL_EVENT = {
    JobStatus.COMPLETED: EventType.COMPLETED,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELLED: EventType.CANCELLED,
    JobStatus.BUDGET_KILLED: EventType.BUDGET_KILLED,
}


class _StopRequested(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _BootFailed(Exception):
    """The instance will never become usable (failed, stopped or vanished while booting): try the next offer."""


@dataclass
class Lifecycle:
    """Runs one job. Injected: the budget, the state store, the connection pool, who owns it."""

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
        return None if self.launched_at is None else _utc(self.launched_at)

    def meter(self) -> Meter:
        return Meter(rate=self.rate, cap=self.cap, since=self.launched_at, spent=self.spent, clock=self.clock)

    def cost_so_far(self) -> Decimal:
        return self.meter().cost()

    # -- the whole thing ------------------------------------------------------------------------------------

    async def run(self) -> JobResult:
        job, plan = self.job, self.plan
        error: BaseException | None = None
        reserved = False
        try:
            job.emit(EventType.QUEUED, max_cost_usd=plan.cap_usd, provider=", ".join(plan.providers))
            offers = await self._select_offer()
            reservation = await asyncio.to_thread(
                self.budget.reserve, job_id=job.id, name=plan.spec.name, provider=self.chosen.name,
                gpu=offers[0].gpu_model or "", amount=self.cap)
            reserved = True
            job.emit(EventType.BUDGET_RESERVED, max_cost_usd=self.cap)
            for warning in reservation.warnings:
                job.emit(EventType.BUDGET_WARNING, message=warning)
            self.retries_left = plan.spec.retries
            while True:
                self._check_cancel()
                await self._launch(offers)
                try:
                    await self._run_remote()
                    break
                except Preempted as exc:
                    offers = await self._after_preemption(exc)
        except BaseException as exc:
            error = exc
        finally:
            result = await self._teardown(error, reserved)
        job._finish(result)
        return result

    # -- steps ----------------------------------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self.job.cancel_requested.is_set() or self.job.handed_off.is_set():
            raise _StopRequested("cancelled")

    async def _select_offer(self) -> list[Offer]:
        """Search, choose the best, fix the cap. Returns the ranked offers to try in turn."""
        offers, errors = await self.plan.search()
        for name, text in errors.items():
            self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {name} left out of the search: {text}\n")
        if not offers:
            raise self.plan.no_offer(errors)
        self._choose(offers[0])
        self.cap = self.plan.decide_cap(offers[0], self.chosen.teardown_seconds)
        return offers

    def _choose(self, offer: Offer) -> None:
        self.offer, self.rate = offer, offer.price_usd_per_hour
        self.provider = self.plan.providers[offer.provider]
        self.job.emit(EventType.OFFER_SELECTED, provider=offer.provider, gpu=offer.gpu_model,
                      cost_per_hour_usd=self.rate, max_cost_usd=self.cap or None,
                      message=offer.description or None)

    def _handoff(self) -> dict[str, Any]:
        # What bounds a reaper's wait on the agent: the cap, what earlier attempts spent, the maximum duration.
        return {**self.plan.handoff, "provider_config": self.plan.configs[self.chosen.name].to_json(),
                "max_cost_usd": str(self.cap), "spent_usd": str(self.spent), "max_seconds": self.plan.max_seconds,
                **({"first_launch": self.first_launch} if self.first_launch is not None else {})}

    def _billing_handoff(self, since: dt.datetime) -> dict[str, Any]:
        """The handoff with what the attempt bills, for a row that has no instance recorded yet: a kernel that
        dies during the create leaves cleanup only this, and an instance that was made bills from ``since``."""
        return {**self._handoff(), "rate": str(self.rate), "attempt": self.attempt,
                "gpu": self.offer.gpu_model if self.offer else None, "launched_at": since.isoformat()}

    async def _launch(self, offers: list[Offer]) -> None:
        """Rent the best offer; move to the next when one is taken, or never boots and is confirmed gone."""
        job, plan = self.job, self.plan
        for i, offer in enumerate(offers[:_MAX_LAUNCH_ATTEMPTS]):
            if i:
                self._choose(offer)
            intent = self._billing_handoff(_utc(self.clock.time()))
            if self.recorded:
                await asyncio.to_thread(self.state.record_attempt, job.id, offer.provider, intent)
            else:
                await asyncio.to_thread(self.state.record_intent, job.id, offer.provider, self.owner, intent)
                self.recorded = True
            self._check_cancel()
            provider = self.chosen
            if self.key is None and provider.name in MARKETPLACES and plan.keys_dir is not None:
                self.key = await asyncio.to_thread(create_job_key, plan.keys_dir, job.id,
                                                   comment=f"{plan.tag}/{job.id}")
            job.emit(EventType.PROVISIONING, provider=provider.name, message=offer.description or None)
            self.launched_at = self.clock.time()  # cost counts from the create request, on the wall clock
            self.first_launch = self.first_launch or self.launched_at
            try:
                instance = await provider.launch(offer, plan.spec, job_id=job.id, tag=plan.tag,
                                                 ssh_public_key=self.key.public_line if self.key else None,
                                                 watch=self._boot_watch())
            except NoCapacity as exc:
                # Taken between search and create: nothing was made; the next offer may still be there.
                self.launched_at = None
                if plan.offers is not None:
                    plan.offers.forget(offer)
                job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {offer.provider}: {exc}; trying the next "
                         "offer\n")
                await asyncio.to_thread(self.state.mark_abandoned, job.id)
                continue
            self.instance = instance
            await asyncio.to_thread(self.state.record_launched, job.id, instance.instance_id,
                                    {**self._handoff(), **self._instance_handoff()})
            job.emit(EventType.PROVISIONED, provider=provider.name, instance_id=instance.instance_id,
                     gpu=instance.gpu_model, cost_per_hour_usd=instance.price_usd_per_hour, max_cost_usd=self.cap)
            try:
                await self._wait_ready()
                return
            except _BootFailed as exc:
                self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {self.chosen.name} instance "
                              f"{instance.instance_id} {exc}; ending it\n")
                await self._end_attempt("boot-failed", str(exc))
        raise NoCapacity(f"tried {min(len(offers), _MAX_LAUNCH_ATTEMPTS)} offer(s); none could be rented")

    async def _end_attempt(self, status: str, why: str) -> None:
        """An instance this job can no longer use (never booted, preempted): end it and bill it on a ledger row of
        its own. Only once it is confirmed gone may the job rent elsewhere (never two instances billing at once)."""
        assert self.instance is not None and self.launched_at is not None and self.launched_wall is not None
        instance = self.instance
        problem = await terminate_confirmed(self.chosen, instance.instance_id, timeout=self.terminate_timeout)
        if problem is not None:
            raise ProvisioningFailed(f"{self.chosen.name} instance {instance.instance_id} {why}, and could not "
                                     f"be confirmed gone: {problem}")
        cost = self.meter().attempt_cost()
        self.spent += cost
        await asyncio.to_thread(self.state.mark_terminated, self.job.id)
        if instance.endpoint is not None:
            await asyncio.to_thread(self.connections.reset, instance.endpoint)
        if self.key is not None:
            # The host key pinned for that instance dies with it: a marketplace may hand its ip:port to the next one.
            self.key.known_hosts.unlink(missing_ok=True)
        await asyncio.to_thread(
            self.budget.record_attempt, self.job.id, attempt=self.attempt, provider=self.chosen.name,
            instance_id=instance.instance_id, gpu=instance.gpu_model or "", rate_usd_per_hour=self.rate,
            started_at=self.launched_wall, ended_at=_utc(self.clock.time()), actual_usd=cost,
            status=status, name=self.job.spec.name, message=why)
        self.instance, self.launched_at = None, None
        self.attempt += 1

    async def _after_preemption(self, exc: Preempted) -> list[Offer]:
        """The provider took the instance mid-run. End it (a paused bid still bills its disk) and bill the attempt;
        with --retries left, return the offers to relaunch on: the next attempt uploads the rw mounts as they are
        now, i.e. with what the last --sync-every pull (and the sink) received."""
        job, lost = self.job, self.offer
        assert self.instance is not None
        job.emit(EventType.PREEMPTED, provider=self.chosen.name, instance_id=self.instance.instance_id,
                 message=str(exc), cost_so_far_usd=self.cost_so_far())
        await self._end_attempt("preempted", str(exc))
        if lost is not None:
            self.tried.add(f"{lost.provider}:{lost.offer_id}")
        if self.retries_left <= 0:
            raise Preempted(f"{exc}; no --retries left" if self.plan.spec.retries else
                            f"{exc} (--retries N relaunches on the next offer)") from None
        self.retries_left -= 1
        self._reset_attempt()
        offers, errors = await self.plan.search(refresh=True)  # live prices: the market moved since the first search
        # Offers not lost yet come first. A lost one stays last, not out: a RunPod offer is a GPU type, not a
        # machine, and a fresh pod of that type lands elsewhere.
        offers.sort(key=lambda o: f"{o.provider}:{o.offer_id}" in self.tried)
        if not offers:
            raise self.plan.no_offer(errors)
        left = self.cap - self.spent
        try:
            check_cap(left, offers[0].price_usd_per_hour, self.plan.providers[offers[0].provider].teardown_seconds)
        except ConfigError as cap_problem:
            raise BudgetKilled(f"preempted, and what is left of the cap cannot pay for a relaunch: {cap_problem}"
                               ) from None
        job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: relaunching (attempt {self.attempt}, "
                 f"{self.retries_left} retr{'y' if self.retries_left == 1 else 'ies'} left after this)\n")
        self._choose(offers[0])
        return offers

    def _reset_attempt(self) -> None:
        """Forget what the lost attempt's agent said: the relaunch runs the job from the start."""
        self.started, self.stop_reason, self.remote_error, self.setup_error = False, None, None, None
        self.exit_record, self.received = None, None
        self.stop_sent, self.stop_confirmed, self.cancel_by = None, False, None

    async def _wait_ready(self) -> None:
        """Poll the provider until the instance runs, then SSH until it answers: one overall timeout."""
        assert self.instance is not None
        provider, job = self.chosen, self.job
        deadline = self.clock.monotonic() + self.plan.provision_timeout
        delay = min(1.0, provider.poll_seconds)
        last = ""
        while self.instance.state is not InstanceState.RUNNING or self.instance.endpoint is None:
            self._check_cancel()
            self._check_budget()
            if self.clock.monotonic() + delay > deadline:
                raise ProvisioningFailed(f"{provider.name} instance {self.instance.instance_id} did not start within "
                                         f"{self.plan.provision_timeout:.0f} s ({self.instance.detail or 'pending'})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, provider.poll_seconds)
            try:
                current = await provider.get(self.instance.instance_id)
            except (RateLimited, ConnectFailed) as exc:
                # Its own retries are spent, but the instance is booting either way: ask again at the next poll,
                # until the provisioning deadline (a refused key or a 4xx is not waited out).
                job.emit(EventType.PROVISIONING, provider=provider.name, message=f"status unknown for now: {exc}")
                continue
            if current is None:
                raise _BootFailed("vanished while booting")
            if current.state in (InstanceState.FAILED, InstanceState.STOPPED):
                raise _BootFailed(f"failed to boot ({current.detail or current.state.value})")
            self.instance = current
            self._check_billed_rate()
            if current.detail and current.detail != last:
                last = current.detail
                job.emit(EventType.PROVISIONING, provider=provider.name, message=current.detail)
        if self.key is not None:
            assert self.instance.endpoint is not None
            endpoint = dataclasses.replace(self.instance.endpoint, key_path=str(self.key.private_path),
                                           known_hosts=str(self.key.known_hosts), trust_on_first_use=True)
            self.instance = dataclasses.replace(self.instance, endpoint=endpoint)
        await asyncio.to_thread(self.state.update_handoff, job.id, **self._instance_handoff())
        await self._wait_ssh(deadline)

    def _check_billed_rate(self) -> None:
        """The rate actually billed, read back: above --max-price or the cap, the instance is ended at once."""
        assert self.instance is not None
        billed = self.instance.price_usd_per_hour
        if billed == self.rate:
            return
        quoted, self.rate = self.rate, billed
        spec, name = self.plan.spec, self.chosen.name
        if spec.max_price_usd_per_hour is not None and billed > spec.max_price_usd_per_hour:
            ceiling = format_usd(spec.max_price_usd_per_hour)
            raise ProvisioningFailed(f"{name} bills {format_usd(billed)}/h for {self.instance.instance_id} (quoted "
                                     f"{format_usd(quoted)}/h), above --max-price {ceiling}/h; the instance was ended")
        try:
            check_cap(self.cap, billed, self.chosen.teardown_seconds)
        except ConfigError as exc:
            raise ProvisioningFailed(f"{name} bills {format_usd(billed)}/h for {self.instance.instance_id} (quoted "
                                     f"{format_usd(quoted)}/h): {exc}; the instance was ended") from None
        self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {name} bills {format_usd(billed)}/h "
                      f"(quoted {format_usd(quoted)}/h)\n")
        self.job.emit(EventType.PROVISIONED, provider=name, instance_id=self.instance.instance_id,
                      cost_per_hour_usd=billed, max_cost_usd=self.cap)

    async def _wait_ssh(self, deadline: float) -> None:
        """A running instance may take a while to answer SSH (sshd starting, the key being installed)."""
        assert self.instance is not None and self.instance.endpoint is not None
        endpoint, delay = self.instance.endpoint, 0.25
        while True:
            self._check_cancel()
            self._check_budget()
            try:
                await self._within_budget(lambda: self.connections.get(endpoint))
                return
            except HostKeyError:
                raise  # a different host answering is never waited out
            except (ProviderError, OSError, EOFError) as exc:  # refused, not up yet, key not installed yet
                if self.clock.monotonic() + delay > deadline:
                    raise ProvisioningFailed(f"{self.chosen.name} instance {self.instance.instance_id} did not answer "
                                             f"SSH at {endpoint} within {self.plan.provision_timeout:.0f} s: "
                                             f"{one_line(exc)}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    def _boot_watch(self) -> BootWatch:
        """The boot watchdog's terms (providers/_boot_watchdog.py): this job's lease, and when its money or its
        maximum duration runs out, on the wall clock, from this create request."""
        left = self._seconds_left()
        return BootWatch(lease_seconds=self.plan.spec.lease_seconds,
                         end_by=0.0 if left is None else self.clock.time() + max(left, 0.0))

    def _instance_handoff(self) -> dict[str, Any]:
        assert self.instance is not None and self.launched_wall is not None
        endpoint = self.instance.endpoint
        return {
            "instance_id": self.instance.instance_id,
            "workdir": self.instance.workdir,
            "python": self.instance.python,
            **({"endpoint": endpoint.to_json()} if endpoint is not None else {}),
            "rate": str(self.rate),
            "gpu": self.instance.gpu_model,
            "launched_at": self.launched_wall.isoformat(),
            "attempt": self.attempt,
        }

    def _client(self) -> AgentClient:
        assert self.instance is not None and self.instance.endpoint is not None
        return self.connections.agent(self.instance.endpoint, self.instance.python, self.instance.workdir)

    def _manifest(self) -> dict[str, Any]:
        plan, spec = self.plan, self.plan.spec
        require_gpu: list[str] | None = None
        if spec.gpu_model is not None:
            require_gpu = [] if spec.gpu_model == ANY else list(CATALOG[spec.gpu_model].nvidia_smi)
        return {
            "job_id": self.job.id,
            "tag": plan.tag,
            "created": self.clock.time(),
            "mounts": [m.manifest() for m in plan.mounts],
            "pull": list(spec.pull),
            "command": spec.command,
            "lease_seconds": spec.lease_seconds,
            # The agent's own deadline is a backstop a little after the client's.
            "deadline_seconds": plan.max_seconds + 60,
            "require_gpu": require_gpu,
            "gpus": spec.gpus,
            **self._money_manifest(),
            **dead_mans_switch(self.chosen, plan.sink, max_seconds=plan.max_seconds, lease_seconds=spec.lease_seconds),
        }

    def _money_manifest(self) -> dict[str, Any]:
        """What the agent needs to hold the cap with nobody watching (decimal strings: money is never a float).
        ``billed_seconds``: this attempt's time since its create request, on this machine's wall clock; the agent
        adds its own from when it reads the manifest, so a clock set wrong on either side changes nothing."""
        assert self.launched_at is not None
        return {"rate_usd_per_hour": str(self.rate), "cap_usd": str(self.cap), "spent_usd": str(self.spent),
                "billed_seconds": max(self.clock.time() - self.launched_at, 0.0),
                "stop_reserve_seconds": self._reserve_seconds(), "teardown_seconds": self.chosen.teardown_seconds}

    async def _run_remote(self) -> None:
        job, plan = self.job, self.plan
        assert self.instance is not None
        client = await asyncio.to_thread(self._client)
        job.emit(EventType.SSH_READY, instance_id=self.instance.instance_id, message=client.runner.description)
        job.emit(EventType.PROTECTED, message=protection(self.chosen, plan.sink, lease_seconds=plan.spec.lease_seconds,
                                                         max_seconds=plan.max_seconds).describe())
        self._check_cancel()
        job.emit(EventType.SYNCING_UP, message=_describe_mounts(plan.mounts))
        t0 = self.clock.monotonic()
        compress = self.instance.endpoint is not None and not self.instance.endpoint.is_local
        notes: list[str] = []

        def bundle(sink: Any) -> None:
            notes.extend(write_bundle(sink, plan.mounts, cell=plan.cell, pushed=plan.pushed, compress=compress))

        self._check_cancel()
        stream = await asyncio.to_thread(client.start, self._manifest(), bundle)
        self.sync_up_seconds = self.clock.monotonic() - t0
        await self._record_mounts()  # what went up: a reaper finishing the job tells local edits from it
        for note in notes:
            job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {note}\n")
        await self._follow(client, stream)

    async def _follow(self, client: AgentClient, stream: AgentStream) -> None:
        """Stream records until the results are in; renew the lease, enforce cap/deadline/cancel, reconnect."""
        job, spec = self.job, self.plan.spec
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        lease_every = min(max(spec.lease_seconds / 4, 1.0), 20.0) if spec.lease_seconds else None
        last_lease = last_pull = self.clock.monotonic()
        pull: asyncio.Future[None] | None = None
        reconnects = 0
        refetch_at: float | None = None  # results are missing here (a local write error): ask again then
        self._start_reader(stream, queue, loop)
        while True:
            try:
                kind, payload = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                kind, payload = "tick", None
            if kind == "record":
                self._on_record(payload)
                if payload.get("k") == "exit" and payload.get("reason") == "agent-died":
                    await self._check_preempted()  # a container stopped under the agent: taken away, or a crash
            elif kind == "results":
                await self._on_results(payload)
                if not payload.unwritten:
                    return
                refetch_at = self.clock.monotonic() + _REFETCH_SECONDS  # kept, with its results, until the cap
            elif kind == "refetch-failed":
                refetch_at = self.clock.monotonic() + _REFETCH_SECONDS
            elif kind in ("eof", "results-failed"):
                # Dropped mid-stream, or while the results came back: the job (and its files) wait on the
                # instance; attach again where we stopped (after the exit line that means: only the results).
                reconnects += 1
                if reconnects > _MAX_RECONNECTS:
                    raise SyncError(f"gave up after {_MAX_RECONNECTS} broken transfers: {payload}")
                stream = await self._reconnect(stream)
                self._start_reader(stream, queue, loop)
                continue
            elif kind == "error":
                raise payload
            if self.job.handed_off.is_set():
                raise _StopRequested("cancelled")  # a reaper owns the instance now: hands off
            now = self.clock.monotonic()
            if lease_every and now - last_lease >= lease_every:
                # Also while the results come back: the agent's watchdog outlives the cell until they are fetched.
                last_lease = now
                await self._send(stream, "lease")
            end = self._must_end()
            if end is not None:
                raise self._end_now(end)
            if self.exit_record is not None:
                if self.received is not None and self.received.unwritten:
                    # Waiting on this machine's disk, never past the cap, the maximum duration or a cancel.
                    reason = self._should_stop()
                    if reason is not None:
                        self.lost = self.received.missing()
                        raise _StopRequested(reason)
                    if refetch_at is not None and now >= refetch_at:
                        refetch_at = None
                        self._start_refetch(queue, loop)
                continue  # the cell is over: only the results remain
            if spec.sync_every_seconds and self.started and now - last_pull >= spec.sync_every_seconds \
                    and (pull is None or pull.done()):
                last_pull = now
                pull = asyncio.ensure_future(self._pull())
            if self.stop_reason is None:
                reason = self._should_stop()
                if reason is not None:
                    self.stop_reason, self.stop_sent = reason, self.clock.monotonic()
                    job.emit(EventType.STOPPING, message=_STOP_TEXT[reason], cost_so_far_usd=self.cost_so_far())
                    await self._send(stream, f"stop {reason}")
            elif self.stop_reason != "cancelled" and self.cancel_by is None and self.job.cancel_requested.is_set():
                # Cancelled while another stop is under way: a short last chance for the results, then the end.
                self.cancel_by = self.clock.monotonic() + _CANCEL_RECONNECT_SECONDS
                job.emit(EventType.STOPPING, message=f"cancelled while stopping; the instance is ended within "
                         f"{_CANCEL_RECONNECT_SECONDS:.0f} s", cost_so_far_usd=self.cost_so_far())

    def _should_stop(self) -> str | None:
        """Why the agent should be asked to stop the job now (None: not yet)."""
        if self.job.cancel_requested.is_set():
            return "cancelled"
        if self.first_launch is not None and self.clock.time() - self.first_launch > self.plan.max_seconds:
            return "deadline"
        if self.meter().exhausted(reserve=self._reserve_seconds()):
            return "budget"
        return None

    def _must_end(self) -> str | None:
        """Why the instance must be ended through the provider's API now, whatever the agent says (None: not yet):
        the money left buys only the terminate; the maximum duration is over by more than a stop takes; a stop the
        agent never confirmed; a cancel's last chance is over. Checked after a stop and while results come back,
        so a first stop never switches the limits off."""
        if self.meter().exhausted(reserve=self.chosen.teardown_seconds + 2 * _TICK_SECONDS):
            return "budget"
        if self.first_launch is not None and \
                self.clock.time() - self.first_launch > self.plan.max_seconds + self._reserve_seconds():
            return "deadline"
        if self.stop_sent is not None and not self.stop_confirmed and self.exit_record is None \
                and self.clock.monotonic() - self.stop_sent > STOP_GRACE_SECONDS:
            return "unconfirmed"
        if self.cancel_by is not None and self.clock.monotonic() > self.cancel_by:
            return "cancelled"
        return None

    def _end_now(self, why: str) -> _StopRequested:
        """The instance is ended through the provider (the teardown that follows): say why, and what is lost."""
        reason = self.stop_reason or ("cancelled" if why == "unconfirmed" else why)
        self.stop_reason = reason
        text = {"budget": f"the cap ({format_usd(self.cap)}) leaves only the terminate",
                "deadline": "the maximum duration is over",
                "unconfirmed": f"the agent did not confirm the stop within {STOP_GRACE_SECONDS:.0f} s",
                "cancelled": "a cancel's last chance is over"}[why]
        self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {text}; ending the instance through "
                      f"{self.chosen.name}'s API\n")
        self.lost = _unsynced(self.plan) if self.received is None else self.received.missing()
        return _StopRequested(reason)

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
        if reason in ("budget", "deadline"):
            raise _StopRequested(reason)

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
            raise _StopRequested(self._should_stop() or "budget") from None

    async def _send(self, stream: AgentStream, line: str) -> None:
        try:
            await asyncio.to_thread(stream.send, line)
        except OSError:
            pass  # the connection is dropping; the reader notices and we re-attach

    def _receive(self, stream: AgentStream) -> Received:
        """The results from ``stream`` into the rw mounts (and the sink), one transfer at a time. Past the results
        limit the stream is closed, not read to its end."""
        plans, sink = self.plan.mounts, self.plan.sink
        with self.sync_lock:
            try:
                return stream.read_results(lambda f: receive_results(
                    f, plans, sink=sink, job_id=self.job.id, max_bytes=self.plan.spec.max_results_bytes))
            except ResultsTooLarge as exc:
                stream.close()
                assert isinstance(exc.received, Received)
                return exc.received

    async def _on_results(self, got: Received) -> None:
        """Results landed: keep them, tell what did not land as sent, and record what is here now."""
        self.received = got
        self._say(got.notes)
        if got.unwritten:
            self._say([f"the instance is kept with these results and asked again every {_REFETCH_SECONDS:.0f} s "
                       "until the cost cap or the maximum duration (free some space, or cancel to end it now)"])
        await self._record_mounts()

    def _say(self, notes: list[str]) -> None:
        """Notes on a results transfer into the job view, each once (a pull or a refetch repeats them)."""
        for note in notes:
            if note not in self.said:
                self.said.add(note)
                self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {note}\n")

    async def _record_mounts(self) -> None:
        """The rw mounts as uploaded and synced back so far, into the handoff a reaper would work from."""
        def record() -> None:
            with self.sync_lock:  # not while a transfer changes them
                mounts = [m.to_json() for m in self.plan.mounts]
            self.plan.handoff["mounts"] = mounts
            self.state.update_handoff(self.job.id, mounts=mounts)

        await asyncio.to_thread(record)

    def _start_refetch(self, queue: asyncio.Queue[tuple[str, Any]], loop: asyncio.AbstractEventLoop) -> None:
        def fetch() -> None:
            stream = self._client().results()
            try:
                for _ in stream.records():
                    pass
                result: tuple[str, Any] = ("results", self._receive(stream))
            except (BurstError, OSError, EOFError) as exc:
                result = ("refetch-failed", exc)
            finally:
                stream.close()
            loop.call_soon_threadsafe(queue.put_nowait, result)

        threading.Thread(target=fetch, name=f"burst-{self.job.id}-refetch", daemon=True).start()

    def _start_reader(self, stream: AgentStream, queue: asyncio.Queue[tuple[str, Any]],
                      loop: asyncio.AbstractEventLoop) -> None:
        def post(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        def read() -> None:
            try:
                for record in stream.records():
                    post("record", record)
                if stream.exit is None:
                    post("eof", None)
                    return
                post("results", self._receive(stream))
            except (RemoteSetupError, UnsafeResults) as exc:  # fetching again would change nothing
                post("error", exc)
            except Exception as exc:  # a transport failure: re-attach, or fetch the results again
                stream.close()
                post("eof" if stream.exit is None else "results-failed", exc)
            # On success the front stays open: the provider's terminate ends the job over it.

        threading.Thread(target=read, name=f"burst-{self.job.id}-reader", daemon=True).start()

    async def _pull(self) -> None:
        """A --sync-every pull: the rw changes so far (and into the sink), over a channel of its own beside the
        stream. A failure costs nothing but this pull: the final results still come back at the end."""
        def pull() -> Received:
            stream = self._client().results()
            try:
                for _ in stream.records():
                    pass
                return self._receive(stream)
            finally:
                stream.close()

        try:
            got = await asyncio.to_thread(pull)
        except (BurstError, OSError, EOFError) as exc:
            self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: periodic sync failed ({one_line(exc)}); "
                          "the final sync still runs\n")
            return
        await self._record_mounts()
        self._say(got.notes)
        note = f"; {got.sink_note}" if got.sink_note else ""
        self.job.emit(EventType.SYNCED, message=f"{len(got.files)} changed file(s) from rw mounts{note}",
                      cost_so_far_usd=self.cost_so_far())

    async def _reconnect(self, old: AgentStream) -> AgentStream:
        """The connection dropped mid-stream: the job runs on, detached. Re-attach where we stopped reading.

        While it fails, the provider is asked whether the instance is still there (a spot instance taken away
        raises Preempted). Once the cell is over and only its results are missing, the instance is kept and tried
        again until the cap or the maximum duration says stop (or a cancel's short last chance ends): then what is
        lost is said, in the job view and the ledger."""
        assert self.instance is not None
        self.job.emit(EventType.RECONNECTING, message=f"connection lost; re-attaching at byte {old.offset}")
        deadline = self.clock.monotonic() + self.reconnect_timeout
        delay, next_check = 0.25, 0.0
        last: BaseException | None = None
        while True:
            if self.job.cancel_requested.is_set():
                # Cancelled during an outage: a short last chance to bring the results back, then tear down
                # (an unconfirmed terminate leaves the state row for `%burst cleanup`).
                deadline = min(deadline, self.clock.monotonic() + _CANCEL_RECONNECT_SECONDS)
            try:
                if last is not None:
                    self._check_budget()  # unreachable at the cap or the maximum duration: end it now
                stream = await self._within_budget(lambda: self._attach_again(old.offset))
                stream.exit = old.exit
                return stream
            except _StopRequested as stop:
                self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {_STOP_TEXT[stop.reason]} while "
                              f"{self.instance.endpoint} was unreachable ({last or 'no answer'})\n")
                self.lost = _unsynced(self.plan)
                raise
            except HostKeyError:
                raise  # another host answering on the instance's address is never waited out
            except (ProviderError, OSError, EOFError) as exc:
                last = exc
                if self.clock.monotonic() >= next_check:
                    next_check = self.clock.monotonic() + self.chosen.poll_seconds
                    await self._check_preempted()
                if self.clock.monotonic() + delay > deadline \
                        and (old.exit is None or self.job.cancel_requested.is_set()):
                    what = _unsynced(self.plan)
                    raise ConnectFailed(f"lost the connection to {self.instance.endpoint} and could not get it "
                                        f"back within {self.reconnect_timeout:.0f} s: {exc}"
                                        + (f"; not brought back: {what}" if what else "")) from exc
                left = self._seconds_left()  # the pause before the next try never outlasts the cap
                await asyncio.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, 5.0)

    def _attach_again(self, offset: int) -> AgentStream:
        assert self.instance is not None and self.instance.endpoint is not None
        self.connections.reset(self.instance.endpoint)
        return self._client().attach(offset)

    async def _check_preempted(self) -> None:
        """Raise Preempted when the provider says the instance was taken away (paused, exited, gone)."""
        assert self.instance is not None
        if not self.chosen.bills_from_launch:
            return  # the user's own machine: unreachable is an outage, never a preemption
        try:
            current = await self.chosen.get(self.instance.instance_id)
        except ProviderError:
            return  # the API is down too: keep trying to reconnect
        if current is None:
            raise Preempted(f"{self.chosen.name} instance {self.instance.instance_id} is gone")
        if current.state in (InstanceState.STOPPED, InstanceState.FAILED):
            raise Preempted(f"{self.chosen.name} instance {self.instance.instance_id} was "
                            f"{current.detail or current.state.value}")

    def _on_record(self, r: Record) -> None:
        job, k = self.job, r.get("k")
        if k == "out":  # the instance's data, shown inert: a stream of the two, text bounded by the job
            job.remote_output("stderr" if r.get("s") == "stderr" else "stdout", str(r.get("d", "")))
        elif k == "result" and isinstance(r.get("data"), dict):
            self.shown = RemoteDisplay(r["data"])
        elif k == "progress":
            job.emit(EventType.PROGRESS, percent=r.get("p"), message=r.get("m"))
        elif k == "started":
            self.started = True
            job.emit(EventType.STARTED, instance_id=self.instance.instance_id if self.instance else None)
        elif k == "error":
            self.remote_error = RemoteError(str(r.get("ename")), str(r.get("evalue", "")), list(r.get("tb") or []))
        elif k == "setup-error":
            self.setup_error = str(r.get("m"))
        elif k == "note" and str(r.get("m", "")).startswith("stopping: "):
            self.stop_confirmed = True
            if self.stop_reason is None:
                self.stop_reason = str(r["m"]).removeprefix("stopping: ")
                job.emit(EventType.STOPPING, message=_STOP_TEXT.get(self.stop_reason, self.stop_reason))
        elif k == "exit":
            self.exit_record, self.stop_confirmed = r, True
            job.emit(EventType.SYNCING_DOWN, message=_describe_mounts([m for m in self.plan.mounts if m.rw]))

    # -- teardown: always ----------------------------------------------------------------------------------

    async def _teardown(self, error: BaseException | None, reserved: bool) -> JobResult:
        job = self.job
        if isinstance(error, _StopRequested):
            self.stop_reason, error = error.reason, None
        if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
            self.stop_reason, error = "cancelled", None
        total: Decimal | None = None
        confirmed = terminated_here = False
        if self.instance is None and self.launched_at is not None and not job.handed_off.is_set():
            # The create call failed without an answer (a lost reply, a timeout after sending): the provider
            # may have made the instance anyway. Look for it by this install's tag and job id.
            self.instance = await self._find_lost_instance()
            if self.instance is None:
                await asyncio.to_thread(self.state.mark_abandoned, job.id)
                self.launched_at = None
        if self.instance is not None and not job.handed_off.is_set():
            terminated_here = True
            confirmed = await self._terminate()
            total = self.cost_so_far()
            job.emit(EventType.TERMINATED, instance_id=self.instance.instance_id,
                     total_cost_usd=total if confirmed else None,
                     error=None if confirmed else "terminate not confirmed; `%burst cleanup` will retry")
        elif self.spent > 0:
            total, confirmed = self.spent, True  # every attempt ended before the job did: still billed
        result = self._result(error, total if confirmed else None)
        if self.instance is None:
            # Nothing is rented now: what earlier attempts cost is on their own ledger rows already, and a reaper
            # knows nothing of this reservation, so release it here.
            if reserved:
                await asyncio.to_thread(self.budget.release, job.id)
        elif confirmed and (terminated_here or self.instance is None):
            # Settle even if the exit hooks handed the job off meanwhile: the reaper skips terminated rows.
            await self._settle(result)
        # Otherwise a reaper owns the instance, or the terminate is unconfirmed: the reservation stays counted
        # and the state row stays live until `%burst cleanup` (or the reaper) ends and settles it.
        if self.instance is not None and self.instance.endpoint is not None:
            await asyncio.to_thread(self._client().release)
        if confirmed and self.key is not None and self.plan.keys_dir is not None:
            await asyncio.to_thread(remove_job_key, self.plan.keys_dir, job.id)
        job.emit(_FINAL_EVENT[result.status], total_cost_usd=result.total_cost_usd,
                 max_cost_usd=self.cap or self.plan.cap_usd,
                 error=None if result.error is None else one_line(result.error))
        return result

    async def _find_lost_instance(self) -> Instance | None:
        provider = self.provider
        if provider is None or not provider.bills_from_launch:
            return None  # local and ssh create nothing before launch returns
        try:
            found = [i for i in await provider.list_owned(self.plan.tag) if i.job_id == self.job.id]
        except (ProviderError, OSError) as exc:
            self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: could not look for an instance the failed "
                          f"create may have made ({exc}); `%burst cleanup` will look again\n")
            return None
        if found:
            since = self.launched_wall or _utc(self.clock.time())
            await asyncio.to_thread(self.state.record_launched, self.job.id, found[0].instance_id,
                                    {**self._billing_handoff(since), "instance_id": found[0].instance_id})
        return found[0] if found else None

    async def _terminate(self) -> bool:
        assert self.instance is not None
        problem = await terminate_confirmed(self.chosen, self.instance.instance_id, timeout=self.terminate_timeout)
        if problem is None:
            await asyncio.to_thread(self.state.mark_terminated, self.job.id)
            return True
        self.job.emit(EventType.OUTPUT, stream="stderr",
                      text=f"burst: could not confirm that {self.instance.instance_id} is gone: {problem}\n")
        return False

    def _lost_text(self) -> str:
        """What the job view and the ledger row say was never brought back (the instance was unreachable)."""
        return f"; not brought back: {self.lost}" if self.lost else ""

    def _result(self, error: BaseException | None, total: Decimal | None) -> JobResult:
        job = self.job
        result = JobResult(job_id=job.id, status=JobStatus.COMPLETED, total_cost_usd=total)
        if self.received is not None:
            result.files, result.notes = self.received.files, self.received.notes
            try:
                pulled = unpack_pulled(self.received.values_blob, job.spec.pull)
            except VariableError as exc:  # a values file the agent never writes: nothing of it is unpickled
                pulled = PulledValues()
                error = error or exc
            result.values = pulled.values
            if pulled.problems and error is None and self.remote_error is None and self.stop_reason is None \
                    and self.setup_error is None:  # a cell that never ran defined nothing: say why it did not
                error = VariableError("; ".join(pulled.problems))
        if self.shown is not None:
            result.result = self.shown
        recorded = (self.exit_record or {}).get("reason")
        # A cell that ended by itself before our stop reached it, with its results back, ended as it says.
        # (Not when results waited on this machine's disk until a stop: the stop ended the job, and says why.)
        ended_itself = recorded in ("ok", "error") and self.received is not None and not self.lost
        reason = recorded if ended_itself else (self.stop_reason or recorded)
        rc = (self.exit_record or {}).get("rc")
        if error is None and self.received is not None and self.received.over_limit:
            error = ResultsTooLarge(f"results over the limit: not brought back: {self.received.over_limit}")
        if error is not None:
            result.status, result.error = JobStatus.FAILED, error
        elif reason == "cancelled":
            result.status = JobStatus.CANCELLED
            if self.lost:  # cancelled while results waited for this machine's disk: the ledger says which
                result.error = SyncError("cancelled" + self._lost_text())
        elif reason == "budget":
            result.status = JobStatus.BUDGET_KILLED
            result.error = BudgetKilled(f"stopped at its cost cap ({format_usd(self.cap)})" + self._lost_text())
        elif self.setup_error is not None:
            result.status, result.error = JobStatus.FAILED, RemoteSetupError(self.setup_error)
        elif reason in ("deadline", "lease"):
            # Before remote_error: the stop reaches the cell as KeyboardInterrupt, an effect and not the cause.
            result.status, result.error = JobStatus.FAILED, BurstError(_STOP_TEXT[str(reason)] + self._lost_text())
        elif self.remote_error is not None:
            result.status, result.error = JobStatus.FAILED, self.remote_error
        elif reason == "agent-died":
            result.status, result.error = JobStatus.FAILED, BurstError(_STOP_TEXT[str(reason)])
        elif rc not in (0, None):
            result.status, result.error = JobStatus.FAILED, BurstError(f"the command exited with status {rc}")
        elif self.exit_record is None and result.status is JobStatus.COMPLETED:
            result.status, result.error = JobStatus.FAILED, SyncError("the job ended without an exit status")
        return result

    async def _settle(self, result: JobResult) -> None:
        job = self.job
        assert self.launched_wall is not None
        if not (self.started or self.chosen.bills_from_launch):
            # The user's own machine, and the job never ran: nothing to bill, no ledger row.
            await asyncio.to_thread(self.budget.release, job.id)
            return
        await asyncio.to_thread(
            self.budget.settle, job.id, provider=self.chosen.name,
            instance_id=self.instance.instance_id if self.instance else "",
            gpu=(self.instance.gpu_model if self.instance else None) or (self.offer.gpu_model if self.offer else "")
            or "", rate_usd_per_hour=self.rate, started_at=self.launched_wall,
            ended_at=_utc(self.clock.time()), attempt=self.attempt,
            # This attempt's row: earlier attempts have their own (the job's total is the sum).
            actual_usd=None if result.total_cost_usd is None else result.total_cost_usd - self.spent,
            status=result.status.value, name=job.spec.name,
            message=None if result.error is None else one_line(result.error))


_STOP_TEXT = {
    "cancelled": "cancelled",
    "budget": "reached its cost cap",
    "deadline": "reached its maximum duration",
    "lease": "the agent's lease lapsed (the client went silent)",
    "agent-died": "the agent on the instance died",
}


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def _unsynced(plan: JobPlan) -> str | None:
    return unsynced(plan.mounts, plan.spec.pull)


def unsynced(mounts: list[MountPlan], pull: list[str]) -> str | None:
    """What a job loses when its results never come back: its rw mounts' changes and pulled variables."""
    parts = [f"changes in {m.mount.remote} (rw mount of {m.mount.local})" for m in mounts if m.rw]
    if pull:
        parts.append(f"variables {', '.join(pull)}")
    return ", ".join(parts) or None


def _describe_mounts(mounts: list[MountPlan]) -> str | None:
    return ", ".join(f"{m.mount.local} -> {m.mount.remote}" for m in mounts) or None
