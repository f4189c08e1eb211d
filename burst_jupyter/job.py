"""A job: its handle (:class:`Job`) and its lifecycle (:class:`Lifecycle`), one state machine on the session loop.

select offer -> reserve budget -> record intent -> launch -> record instance -> connect -> upload and start the
agent -> stream (lease, cost cap, deadline, cancel, reconnect) -> results -> terminate -> confirm gone -> settle.
Each step emits a :class:`JobEvent`. The ``finally`` of the lifecycle is the first of the four layers against a
leaked instance: whatever happened, a launched instance is terminated, confirmed gone and settled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import enum
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    BudgetKilled,
    BurstError,
    ConnectFailed,
    JobCancelled,
    NoCapacity,
    ProviderError,
    RemoteError,
    RemoteSetupError,
    SyncError,
    VariableError,
)
from .events import EventType, JobEvent
from .providers.base import Instance, Offer, OfferQuery, Provider, terminate_confirmed
from .providers.catalog import ANY, CATALOG
from .remote import AgentClient, AgentStream, Record
from .sync import MountPlan, Received, receive_results, write_bundle
from .variables import NO_RESULT, unpack_pulled

if TYPE_CHECKING:
    from .budget import Budget
    from .connections import Connections
    from .sinks import ResultSink
    from .spec import JobSpec
    from .state import Owner, StateStore

__all__ = ["Job", "JobPlan", "JobResult", "JobStatus", "Lifecycle"]

_MICRO = Decimal("0.000001")
_MAX_RECONNECTS = 20
_CANCEL_RECONNECT_SECONDS = 15.0


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_KILLED = "budget_killed"

    def __str__(self) -> str:
        return self.value


#: The one final event each way a job can end.
_FINAL_EVENT = {
    JobStatus.COMPLETED: EventType.COMPLETED,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELLED: EventType.CANCELLED,
    JobStatus.BUDGET_KILLED: EventType.BUDGET_KILLED,
}


def cost_of(rate: Decimal, seconds: float) -> Decimal:
    """What ``seconds`` at ``rate`` $/h cost, rounded up to a millionth of a dollar (never under-reported)."""
    return (rate * Decimal(repr(max(seconds, 0.0))) / 3600).quantize(_MICRO, rounding=ROUND_CEILING)


@dataclass
class JobResult:
    """What a finished job left: its status and bill, pulled variables, the last expression's value."""

    job_id: str
    status: JobStatus
    total_cost_usd: Decimal | None
    values: dict[str, Any] = field(default_factory=dict)
    result: Any = NO_RESULT
    error: BaseException | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def raise_for_status(self) -> None:
        if self.error is not None:
            raise self.error
        if self.status is not JobStatus.COMPLETED:
            raise JobCancelled(f"job {self.job_id} ended {self.status.value}")


@dataclass(frozen=True)
class JobPlan:
    """Everything decided before the job is queued (validated input; nothing rented yet)."""

    job_id: str
    spec: JobSpec
    provider: Provider
    cap_usd: Decimal
    max_seconds: float
    mounts: list[MountPlan]
    pushed: dict[str, bytes]
    cell: str | None
    tag: str
    handoff: dict[str, Any]  # what a reaper needs beyond the instance (local mount paths, names)
    sink: ResultSink | None = None  # also receives the rw results; check()ed before anything was rented


class Job:
    """The handle of one job. Thread-safe: events are produced on the session loop, read from anywhere.

    Example:
        >>> job = burst.submit(JobSpec(cell="print(1)"))   # doctest: +SKIP
        >>> job.wait().status                                # doctest: +SKIP
        <JobStatus.COMPLETED: 'completed'>
    """

    def __init__(self, plan: JobPlan, loop: asyncio.AbstractEventLoop) -> None:
        self.id = plan.job_id
        self.spec = plan.spec
        self.plan = plan
        self._loop = loop
        self._events: list[JobEvent] = []
        self._listeners: list[Callable[[JobEvent], None]] = []
        self._lock = threading.Lock()
        self._future: concurrent.futures.Future[JobResult] = concurrent.futures.Future()
        self.cancel_requested = threading.Event()
        self.handed_off = threading.Event()  # the exit hooks gave this job to a reaper: hands off

    # -- produced on the loop thread ------------------------------------------------------------------------

    def emit(self, type: EventType, **fields: Any) -> JobEvent:
        event = JobEvent(type=type, job_id=self.id, **fields)
        with self._lock:
            self._events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken view must never break the job
                import logging

                logging.getLogger(__name__).exception("job listener failed")
        return event

    def _finish(self, result: JobResult) -> None:
        if not self._future.done():
            self._future.set_result(result)

    # -- read from anywhere ---------------------------------------------------------------------------------

    @property
    def events(self) -> list[JobEvent]:
        with self._lock:
            return list(self._events)

    @property
    def status(self) -> JobStatus:
        if self._future.done():
            return self._future.result().status
        started = any(e.type is EventType.STARTED for e in self.events)
        return JobStatus.RUNNING if started else JobStatus.QUEUED

    def done(self) -> bool:
        return self._future.done()

    def add_listener(self, listener: Callable[[JobEvent], None], *, replay: bool = True) -> Callable[[], None]:
        """Call ``listener(event)`` on the loop thread for every event (past ones first when ``replay``)."""
        with self._lock:
            past = list(self._events) if replay else []
            self._listeners.append(listener)
        for event in past:
            listener(event)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def result(self, timeout: float | None = None) -> JobResult:
        """The result once done (blocks up to ``timeout``; raises TimeoutError)."""
        return self._future.result(timeout)

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends, in short slices so Ctrl-C gets through; Ctrl-C cancels the job, waits for
        its clean-up (sync back, terminate, settle) and then raises KeyboardInterrupt."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._future.done():
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} still running after {timeout} s")
                concurrent.futures.wait([self._future], timeout=0.1)
        except KeyboardInterrupt:
            self.cancel()
            while not self._future.done():
                concurrent.futures.wait([self._future], timeout=0.1)
            raise
        return self._future.result()

    def cancel(self) -> None:
        """Stop the job: its rw mounts are synced back, the instance terminated and the bill settled."""
        # The lifecycle checks this between steps and on every 0.25 s tick of the stream.
        self.cancel_requested.set()

    def __await__(self) -> Generator[Any, None, JobResult]:
        return asyncio.wrap_future(self._future).__await__()

    async def stream_events(self) -> AsyncIterator[JobEvent]:
        """Every event of the job, past and future, on the caller's own event loop; ends after the final one."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        def forward(event: JobEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        remove = self.add_listener(forward)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.is_final:
                    return
        finally:
            remove()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status.value} ({self.spec.name})>"


class _StopRequested(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


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
    instance: Instance | None = None
    offer: Offer | None = None
    rate: Decimal = Decimal(0)
    launched_at: float | None = None  # monotonic, at the create request
    launched_wall: dt.datetime | None = None
    started: bool = False
    stop_reason: str | None = None
    remote_error: RemoteError | None = None
    setup_error: str | None = None
    exit_record: Record | None = None
    received: Received | None = None
    sync_up_seconds: float = 0.0

    @property
    def plan(self) -> JobPlan:
        return self.job.plan

    @property
    def provider(self) -> Provider:
        return self.plan.provider

    def cost_so_far(self) -> Decimal:
        return Decimal(0) if self.launched_at is None else cost_of(self.rate, time.monotonic() - self.launched_at)

    # -- the whole thing ------------------------------------------------------------------------------------

    async def run(self) -> JobResult:
        job, plan = self.job, self.plan
        error: BaseException | None = None
        reserved = False
        try:
            job.emit(EventType.QUEUED, max_cost_usd=plan.cap_usd, provider=self.provider.name)
            self.offer = await self._select_offer()
            self.rate = self.offer.price_usd_per_hour
            job.emit(EventType.OFFER_SELECTED, provider=self.offer.provider, gpu=self.offer.gpu_model,
                     cost_per_hour_usd=self.rate, message=self.offer.description or None)
            reservation = await asyncio.to_thread(
                self.budget.reserve, job_id=job.id, name=plan.spec.name, provider=self.offer.provider,
                gpu=self.offer.gpu_model or "", amount=plan.cap_usd)
            reserved = True
            job.emit(EventType.BUDGET_RESERVED, max_cost_usd=plan.cap_usd)
            for warning in reservation.warnings:
                job.emit(EventType.BUDGET_WARNING, message=warning)
            self._check_cancel()
            await self._launch()
            await self._run_remote()
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

    async def _select_offer(self) -> Offer:
        spec = self.plan.spec
        query = OfferQuery(gpu_model=spec.gpu_model, gpus=spec.gpus, memory_gb=spec.memory_gb,
                           max_price_usd_per_hour=spec.max_price_usd_per_hour)
        offers = await self.provider.offers(query)
        if not offers:
            limit = f" under ${spec.max_price_usd_per_hour}/h" if spec.max_price_usd_per_hour is not None else ""
            raise NoCapacity(f"no {self.provider.name} offer fits {spec.gpus} x {spec.gpu_model or 'any'}{limit}")
        return min(offers, key=lambda o: (o.price_usd_per_hour, -o.reliability))

    async def _launch(self) -> None:
        job, plan = self.job, self.plan
        assert self.offer is not None
        await asyncio.to_thread(self.state.record_intent, job.id, self.provider.name, self.owner, plan.handoff)
        job.emit(EventType.PROVISIONING, provider=self.provider.name)
        self.launched_at = time.monotonic()  # cost counts from the create request
        self.launched_wall = dt.datetime.now(dt.timezone.utc)
        self.instance = await self.provider.launch(self.offer, plan.spec, job_id=job.id, tag=plan.tag,
                                                   ssh_public_key=None)
        self.rate = self.instance.price_usd_per_hour
        handoff = {**plan.handoff, **_instance_handoff(self.instance), "rate": str(self.rate),
                   "gpu": self.instance.gpu_model,
                   "launched_at": self.launched_wall.isoformat()}
        await asyncio.to_thread(self.state.record_launched, job.id, self.instance.instance_id, handoff)
        job.emit(EventType.PROVISIONED, provider=self.provider.name, instance_id=self.instance.instance_id,
                 gpu=self.instance.gpu_model, cost_per_hour_usd=self.rate, max_cost_usd=plan.cap_usd)

    def _client(self) -> AgentClient:
        assert self.instance is not None
        return self.connections.agent(self.instance.endpoint, self.instance.python, self.instance.workdir)

    def _manifest(self) -> dict[str, Any]:
        plan, spec = self.plan, self.plan.spec
        require_gpu: list[str] | None = None
        if spec.gpu_model is not None:
            require_gpu = [] if spec.gpu_model == ANY else list(CATALOG[spec.gpu_model].nvidia_smi)
        return {
            "job_id": self.job.id,
            "tag": plan.tag,
            "created": time.time(),
            "mounts": [m.manifest() for m in plan.mounts],
            "pull": list(spec.pull),
            "command": spec.command,
            "lease_seconds": spec.lease_seconds,
            # The agent's own deadline is a backstop a little after the client's.
            "deadline_seconds": plan.max_seconds + 60,
            "require_gpu": require_gpu,
            "gpus": spec.gpus,
        }

    async def _run_remote(self) -> None:
        job, plan = self.job, self.plan
        assert self.instance is not None
        client = await asyncio.to_thread(self._client)
        job.emit(EventType.SSH_READY, instance_id=self.instance.instance_id, message=client.runner.description)
        self._check_cancel()
        job.emit(EventType.SYNCING_UP, message=_describe_mounts(plan.mounts))
        t0 = time.monotonic()
        compress = not self.instance.endpoint.is_local
        notes: list[str] = []

        def bundle(sink: Any) -> None:
            notes.extend(write_bundle(sink, plan.mounts, cell=plan.cell, pushed=plan.pushed, compress=compress))

        self._check_cancel()
        stream = await asyncio.to_thread(client.start, self._manifest(), bundle)
        self.sync_up_seconds = time.monotonic() - t0
        for note in notes:
            job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {note}\n")
        await self._follow(client, stream)

    async def _follow(self, client: AgentClient, stream: AgentStream) -> None:
        """Stream records until the results are in; renew the lease, enforce cap/deadline/cancel, reconnect."""
        job, spec = self.job, self.plan.spec
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        lease_every = min(max(spec.lease_seconds / 4, 1.0), 20.0) if spec.lease_seconds else None
        last_lease = time.monotonic()
        reconnects = 0
        self._start_reader(stream, queue, loop)
        while True:
            try:
                kind, payload = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                kind, payload = "tick", None
            if kind == "record":
                self._on_record(payload)
            elif kind == "results":
                self.received = payload
                if payload.sink_note:
                    job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {payload.sink_note}\n")
                return
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
            if self.exit_record is not None:
                continue  # the cell is over: only the results remain
            now = time.monotonic()
            if lease_every and now - last_lease >= lease_every:
                last_lease = now
                await self._send(stream, "lease")
            if self.stop_reason is None:
                reason = self._should_stop()
                if reason is not None:
                    self.stop_reason = reason
                    job.emit(EventType.STOPPING, message=_STOP_TEXT[reason], cost_so_far_usd=self.cost_so_far())
                    await self._send(stream, f"stop {reason}")

    def _should_stop(self) -> str | None:
        if self.job.cancel_requested.is_set():
            return "cancelled"
        if self.launched_at is not None and time.monotonic() - self.launched_at > self.plan.max_seconds:
            return "deadline"
        if self.rate > 0:
            # Keep back what the teardown will cost so the whole bill stays inside the cap.
            reserve_s = self.provider.teardown_seconds + max(self.sync_up_seconds, 1.0) + 2.0
            if self.cost_so_far() + cost_of(self.rate, reserve_s) >= self.plan.cap_usd:
                return "budget"
        return None

    async def _send(self, stream: AgentStream, line: str) -> None:
        try:
            await asyncio.to_thread(stream.send, line)
        except OSError:
            pass  # the connection is dropping; the reader notices and we re-attach

    def _start_reader(self, stream: AgentStream, queue: asyncio.Queue[tuple[str, Any]],
                      loop: asyncio.AbstractEventLoop) -> None:
        plans, sink = self.plan.mounts, self.plan.sink

        def post(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        def read() -> None:
            try:
                for record in stream.records():
                    post("record", record)
                if stream.exit is None:
                    post("eof", None)
                    return
                post("results", stream.read_results(lambda f: receive_results(f, plans, sink=sink)))
            except RemoteSetupError as exc:
                post("error", exc)
            except Exception as exc:  # a transport failure: re-attach, or fetch the results again
                stream.close()
                post("eof" if stream.exit is None else "results-failed", exc)
            # On success the front stays open: the provider's terminate ends the job over it.

        threading.Thread(target=read, name=f"burst-{self.job.id}-reader", daemon=True).start()

    async def _reconnect(self, old: AgentStream) -> AgentStream:
        """The connection dropped mid-stream: the job runs on, detached. Re-attach where we stopped reading."""
        assert self.instance is not None
        self.job.emit(EventType.RECONNECTING, message=f"connection lost; re-attaching at byte {old.offset}")
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.25
        while True:
            if self.job.cancel_requested.is_set():
                # Cancelled during an outage: a short last chance to bring the results back, then tear down
                # (an unconfirmed terminate leaves the state row for `%burst cleanup`).
                deadline = min(deadline, time.monotonic() + _CANCEL_RECONNECT_SECONDS)
            try:
                await asyncio.to_thread(self.connections.reset, self.instance.endpoint)
                client = await asyncio.to_thread(self._client)
                stream = await asyncio.to_thread(client.attach, old.offset)
                stream.exit = old.exit
                return stream
            except (ProviderError, OSError, EOFError) as exc:
                if time.monotonic() + delay > deadline:
                    raise ConnectFailed(f"lost the connection to {self.instance.endpoint} and could not get it "
                                        f"back within {self.reconnect_timeout:.0f} s: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _on_record(self, r: Record) -> None:
        job, k = self.job, r.get("k")
        if k == "out":
            job.emit(EventType.OUTPUT, stream=r.get("s", "stdout"), text=r.get("d", ""))
        elif k == "progress":
            job.emit(EventType.PROGRESS, percent=r.get("p"), message=r.get("m"))
        elif k == "started":
            self.started = True
            job.emit(EventType.STARTED, instance_id=self.instance.instance_id if self.instance else None)
        elif k == "error":
            self.remote_error = RemoteError(str(r.get("ename")), str(r.get("evalue", "")), list(r.get("tb") or []))
        elif k == "setup-error":
            self.setup_error = str(r.get("m"))
        elif k == "note" and self.stop_reason is None and str(r.get("m", "")).startswith("stopping: "):
            self.stop_reason = str(r["m"]).removeprefix("stopping: ")
            job.emit(EventType.STOPPING, message=_STOP_TEXT.get(self.stop_reason, self.stop_reason))
        elif k == "exit":
            self.exit_record = r
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
        if self.instance is not None and not job.handed_off.is_set():
            terminated_here = True
            confirmed = await self._terminate()
            total = cost_of(self.rate, time.monotonic() - (self.launched_at or time.monotonic()))
            job.emit(EventType.TERMINATED, instance_id=self.instance.instance_id,
                     total_cost_usd=total if confirmed else None,
                     error=None if confirmed else "terminate not confirmed; `%burst cleanup` will retry")
        elif self.launched_at is not None and self.instance is None:
            # The create call itself failed: the provider may still have made something; reconciliation
            # finds it by tag. Local/ssh create nothing before launch returns.
            await asyncio.to_thread(self.state.mark_abandoned, job.id)
        result = self._result(error, total if confirmed else None)
        if self.instance is None:
            if reserved:  # nothing was rented; a reaper knows nothing of this reservation, so release it here
                await asyncio.to_thread(self.budget.release, job.id)
        elif terminated_here and confirmed:
            # Settle even if the exit hooks handed the job off meanwhile: the reaper skips terminated rows.
            await self._settle(result)
        # Otherwise a reaper owns the instance, or the terminate is unconfirmed: the reservation stays counted
        # and the state row stays live until `%burst cleanup` (or the reaper) ends and settles it.
        if self.instance is not None:
            await asyncio.to_thread(self._client().release)
        job.emit(_FINAL_EVENT[result.status], total_cost_usd=result.total_cost_usd, max_cost_usd=self.plan.cap_usd,
                 error=None if result.error is None else _one_line(result.error))
        return result

    async def _terminate(self) -> bool:
        assert self.instance is not None
        problem = await terminate_confirmed(self.provider, self.instance.instance_id, timeout=self.terminate_timeout)
        if problem is None:
            await asyncio.to_thread(self.state.mark_terminated, self.job.id)
            return True
        self.job.emit(EventType.OUTPUT, stream="stderr",
                      text=f"burst: could not confirm that {self.instance.instance_id} is gone: {problem}\n")
        return False

    def _result(self, error: BaseException | None, total: Decimal | None) -> JobResult:
        job = self.job
        result = JobResult(job_id=job.id, status=JobStatus.COMPLETED, total_cost_usd=total)
        if self.received is not None:
            result.files, result.notes = self.received.files, self.received.notes
            if job.spec.cell is not None:
                pulled = unpack_pulled(self.received.values_blob, job.spec.pull)
                result.values, result.result = pulled.values, pulled.result
                if pulled.problems and error is None and self.remote_error is None and self.stop_reason is None:
                    error = VariableError("; ".join(pulled.problems))
        reason = self.stop_reason or (self.exit_record or {}).get("reason")
        rc = (self.exit_record or {}).get("rc")
        if error is not None:
            result.status, result.error = JobStatus.FAILED, error
        elif reason == "cancelled":
            result.status = JobStatus.CANCELLED
        elif reason == "budget":
            result.status = JobStatus.BUDGET_KILLED
            result.error = BudgetKilled(f"stopped at its cost cap (${self.plan.cap_usd})")
        elif self.setup_error is not None:
            result.status, result.error = JobStatus.FAILED, RemoteSetupError(self.setup_error)
        elif reason in ("deadline", "lease"):
            # Before remote_error: the stop reaches the cell as KeyboardInterrupt, an effect and not the cause.
            result.status, result.error = JobStatus.FAILED, BurstError(_STOP_TEXT[str(reason)])
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
        assert self.instance is not None and self.launched_wall is not None
        if not (self.started or self.provider.bills_from_launch):
            # The user's own machine, and the job never ran: nothing to bill, no ledger row.
            await asyncio.to_thread(self.budget.release, job.id)
            return
        await asyncio.to_thread(
            self.budget.settle, job.id, provider=self.provider.name, instance_id=self.instance.instance_id,
            gpu=self.instance.gpu_model or "", rate_usd_per_hour=self.rate, started_at=self.launched_wall,
            ended_at=dt.datetime.now(dt.timezone.utc), actual_usd=result.total_cost_usd,
            status=result.status.value, name=job.spec.name,
            message=None if result.error is None else _one_line(result.error))


_STOP_TEXT = {
    "cancelled": "cancelled",
    "budget": "reached its cost cap",
    "deadline": "reached its maximum duration",
    "lease": "the agent's lease lapsed (the client went silent)",
    "agent-died": "the agent on the instance died",
}


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0] if text else type(error).__name__


def _describe_mounts(mounts: list[MountPlan]) -> str | None:
    return ", ".join(f"{m.mount.local} -> {m.mount.remote}" for m in mounts) or None


def _instance_handoff(instance: Instance) -> dict[str, Any]:
    return {
        "instance_id": instance.instance_id,
        "workdir": instance.workdir,
        "python": instance.python,
        "endpoint": instance.endpoint.to_json(),
    }
