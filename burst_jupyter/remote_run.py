"""Following the job on its machine (:class:`RemoteRun`): upload and start the agent, then stream its records
until the results are in, renewing the lease, sending stops, pulling --sync-every changes, fetching results again
that this machine could not write, reconnecting, and telling a preemption from an outage. What each record means
is decided by :meth:`~burst_jupyter.attempt.Attempt.take`, and when to stop by
:class:`~burst_jupyter.stop_policy.Limits`: this loop carries them out."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .agent import Control, Reason
from .attempt import agent_died
from .errors import (
    BurstError,
    ConnectFailed,
    HostKeyError,
    Preempted,
    ProviderError,
    RemoteSetupError,
    ResultsTooLarge,
    SyncError,
    UnsafeResults,
    one_line,
)
from .events import EventType
from .follow import CANCEL_RECONNECT_SECONDS, Follower
from .job_run import JobRun, StopRequested
from .protection import dead_mans_switch, protection
from .providers.base import InstanceState
from .providers.catalog import ANY, CATALOG
from .remote import AgentClient, AgentStream, Record
from .stop_policy import STOP_TEXT, TICK_SECONDS
from .sync import MountPlan, write_bundle
from .sync_back import Received, receive_results

if TYPE_CHECKING:
    from .sinks import ResultSink

__all__ = ["REFETCH_SECONDS", "RemoteRun", "fetch_results", "read_results"]

_MAX_RECONNECTS = 20
# Results this machine could not write (a full disk) stay on the kept instance; asked for again this often.
REFETCH_SECONDS = 5.0


class RemoteRun:
    """The job on a ready machine, from the upload to its results."""

    def __init__(self, run: JobRun) -> None:
        self.run = run

    def _manifest(self) -> dict[str, Any]:
        run, plan, spec = self.run, self.run.plan, self.run.plan.spec
        require_gpu: list[str] | None = None
        if spec.gpu_model is not None:
            require_gpu = [] if spec.gpu_model == ANY else list(CATALOG[spec.gpu_model].nvidia_smi)
        return {
            "job_id": run.job.id,
            "tag": plan.tag,
            "created": run.clock.time(),
            "mounts": [m.manifest() for m in plan.mounts],
            "pull": list(spec.pull),
            "cell_file": spec.cell_file,
            "command": spec.command,
            "lease_seconds": spec.lease_seconds,
            # The agent's own deadline is a backstop a little after the client's.
            "deadline_seconds": plan.max_seconds + 60,
            "require_gpu": require_gpu,
            "gpus": spec.gpus,
            **self._money_manifest(),
            **dead_mans_switch(run.chosen, plan.sink, max_seconds=plan.max_seconds, lease_seconds=spec.lease_seconds),
            **self._machine_manifest(),
        }

    def _machine_manifest(self) -> dict[str, Any]:
        """A kept machine's Python process and its idle limit (``%burst up``), or the kept machine a cell runs on."""
        run, plan = self.run, self.run.plan
        if run.idle_seconds is not None:
            # Whole seconds, never 0 (the agent reads 0 as no limit): a limit under a second is held as one second.
            return {"machine": {"idle_seconds": max(1, math.ceil(run.idle_seconds))}}
        if plan.on is not None:
            return {"on_machine": plan.on.jobdir}
        return {}

    def _money_manifest(self) -> dict[str, Any]:
        """What the agent needs to hold the cap with nobody watching (decimal strings: money is never a float).
        ``billed_seconds``: this attempt's time since its create request, on this machine's wall clock; the agent
        adds its own from when it reads the manifest, so a clock set wrong on either side changes nothing."""
        run, machine = self.run, self.run.on
        assert machine.launched_at is not None
        return {"rate_usd_per_hour": str(machine.rate), "cap_usd": str(run.cap), "spent_usd": str(run.spent),
                "billed_seconds": max(run.clock.time() - machine.launched_at, 0.0),
                "stop_reserve_seconds": run.limits().reserve_seconds(),
                "teardown_seconds": machine.provider.teardown_seconds}

    async def start(self) -> None:
        """Upload the job and start its agent on the machine, then follow it to its results."""
        run, job, plan, machine = self.run, self.run.job, self.run.plan, self.run.on
        client = await asyncio.to_thread(machine.client)
        if plan.on is None:  # a cell on a kept machine: where it is and what guards it are the machine's, said there
            job.emit(EventType.SSH_READY, instance_id=machine.running.instance_id, message=client.runner.description)
            guard = protection(run.chosen, plan.sink, lease_seconds=plan.spec.lease_seconds,
                               max_seconds=plan.max_seconds)
            job.emit(EventType.PROTECTED, message=guard.summary, text=guard.describe())
        run.check_cancel()
        if plan.on is None or plan.mounts:
            job.emit(EventType.SYNCING_UP, message=_describe_mounts(plan.mounts))
        t0 = run.clock.monotonic()
        endpoint = machine.running.endpoint
        compress = endpoint is not None and not endpoint.is_local
        notes: list[str] = []

        def bundle(sink: Any) -> None:
            notes.extend(write_bundle(sink, plan.mounts, cell=plan.cell, pushed=plan.pushed, compress=compress))

        run.check_cancel()
        stream = await asyncio.to_thread(client.start, self._manifest(), bundle)
        run.sync_up_seconds = run.clock.monotonic() - t0
        await self._record_mounts()  # what went up: a reaper finishing the job tells local edits from it
        for note in notes:
            run.note(note)
        await self._follow(client, stream)

    async def _follow(self, client: AgentClient, stream: AgentStream) -> None:
        """Stream records until the results are in, taking the steps the :class:`Follower` says (lease, stops,
        pulls, refetches, the end through the API), and reconnecting when the stream drops."""
        run, job, spec = self.run, self.run.job, self.run.plan.spec
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        follower = Follower.start(lease_seconds=spec.lease_seconds, sync_every=spec.sync_every_seconds,
                                  now=run.clock.monotonic())
        pull: asyncio.Future[None] | None = None
        reconnects = 0
        self._start_reader(stream, queue, loop)
        while True:
            try:
                kind, payload = await asyncio.wait_for(queue.get(), timeout=TICK_SECONDS)
            except asyncio.TimeoutError:
                kind, payload = "tick", None
            if kind == "record":
                self._on_record(payload)
                if agent_died(payload):
                    await self._check_preempted()  # a container stopped under the agent: taken away, or a crash
            elif kind == "results":
                await self._on_results(payload)
                if not payload.unwritten:
                    return
                follower.refetch_at = run.clock.monotonic() + REFETCH_SECONDS  # kept, with its results, until the cap
            elif kind == "refetch-failed":
                follower.refetch_at = run.clock.monotonic() + REFETCH_SECONDS
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
            if job.handed_off.is_set():
                raise StopRequested(Reason.CANCELLED)  # a reaper owns the instance now: hands off
            attempt = run.attempt
            for step in follower.steps(run.clock.monotonic(), attempt, run.limits(),
                                       cancelled=job.cancel_requested.is_set(),
                                       pulling=pull is not None and not pull.done()):
                if step.kind == "lease":
                    await self._send(stream, Control.LEASE)
                elif step.kind == "end":
                    raise run.end_now(str(step.reason))
                elif step.kind == "give-up":
                    assert attempt.received is not None
                    run.lost = attempt.received.missing()
                    raise StopRequested(str(step.reason))
                elif step.kind == "refetch":
                    self._start_refetch(queue, loop)
                elif step.kind == "pull":
                    pull = asyncio.ensure_future(self.pull())
                elif step.kind == "stop":
                    job.emit(EventType.STOPPING, message=STOP_TEXT[str(step.reason)], cost_so_far_usd=run.cost_so_far())
                    await self._send(stream, f"{Control.STOP} {step.reason}")
                else:  # cancel-late
                    job.emit(EventType.STOPPING, message=f"cancelled while stopping; the instance is ended within "
                             f"{CANCEL_RECONNECT_SECONDS:.0f} s", cost_so_far_usd=run.cost_so_far())

    def _on_record(self, record: Record) -> None:
        """Tell the job view what the record says (the attempt decides what that is)."""
        run, job = self.run, self.run.job
        for notice in run.attempt.take(record):
            if notice.type is EventType.OUTPUT:
                job.remote_output(notice.fields["stream"], notice.fields["text"])
            elif notice.type is EventType.DISPLAY:
                job.remote_display(notice.fields["data"])
            elif notice.type is EventType.STARTED:
                first = run.idle_seconds is not None and run.last_activity is None
                if first:
                    run.last_activity = run.clock.time()  # a kept machine is ready: its idle time counts from here
                job.emit(EventType.STARTED, instance_id=run.on.instance.instance_id if run.on.instance else None)
                if first:
                    run.note(f"machine {run.job.spec.name} is up; {run.idle_text()}")
            elif notice.type is EventType.SYNCING_DOWN:
                job.emit(EventType.SYNCING_DOWN, message=_describe_mounts([m for m in run.plan.mounts if m.rw]))
            else:
                job.emit(notice.type, **notice.fields)

    async def _send(self, stream: AgentStream, line: str) -> None:
        try:
            await asyncio.to_thread(stream.send, line)
        except OSError:
            pass  # the connection is dropping; the reader notices and we re-attach

    def _receive(self, stream: AgentStream) -> Received:
        """The results from ``stream`` into the rw mounts (and the sink), one transfer at a time."""
        run = self.run
        with run.sync_lock:
            return read_results(stream, run.plan.mounts, sink=run.plan.sink, job_id=run.job.id,
                                max_bytes=run.plan.spec.max_results_bytes)

    async def _on_results(self, got: Received) -> None:
        """Results landed: keep them, tell what did not land as sent, and record what is here now."""
        self.run.attempt.received = got
        self._say(got.notes)
        if got.unwritten:
            self._say([f"the instance is kept with these results and asked again every {REFETCH_SECONDS:.0f} s "
                       "until the cost cap or the maximum duration (free some space, or cancel to end it now)"])
        await self._record_mounts()

    def _say(self, notes: list[str]) -> None:
        """Notes on a results transfer into the job view, each once (a pull or a refetch repeats them)."""
        for note in notes:
            if note not in self.run.said:
                self.run.said.add(note)
                self.run.note(note)

    async def _record_mounts(self) -> None:
        """The rw mounts as uploaded and synced back so far, into the handoff a reaper would work from."""
        run = self.run

        def record() -> None:
            with run.sync_lock:  # not while a transfer changes them
                mounts = [m.to_json() for m in run.plan.mounts]
            run.plan.handoff.mounts = mounts
            run.parts.state.update_handoff(run.job.id, mounts=mounts)

        await asyncio.to_thread(record)

    def _fetch_results(self) -> Received:
        """The rw changes so far (and into the sink), over a channel of its own beside the stream (blocking)."""
        return fetch_results(self.run.on.client(), self._receive)

    def _start_refetch(self, queue: asyncio.Queue[tuple[str, Any]], loop: asyncio.AbstractEventLoop) -> None:
        def fetch() -> None:
            try:
                result: tuple[str, Any] = ("results", self._fetch_results())
            except (BurstError, OSError, EOFError) as exc:
                result = ("refetch-failed", exc)
            loop.call_soon_threadsafe(queue.put_nowait, result)

        threading.Thread(target=fetch, name=f"burst-{self.run.job.id}-refetch", daemon=True).start()

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

        threading.Thread(target=read, name=f"burst-{self.run.job.id}-reader", daemon=True).start()

    async def pull(self) -> None:
        """A --sync-every pull (or, on a kept machine, after each cell): the rw changes so far (and into the sink),
        over a channel of its own beside the stream. A failure costs nothing but this pull: the final results still
        come back at the end."""
        run = self.run
        try:
            got = await asyncio.to_thread(self._fetch_results)
        except (BurstError, OSError, EOFError) as exc:
            run.note(f"periodic sync failed ({one_line(exc)}); the final sync still runs")
            return
        await self._record_mounts()
        self._say(got.notes)
        note = f"; {got.sink_note}" if got.sink_note else ""
        run.job.emit(EventType.SYNCED, message=f"{len(got.files)} changed file(s) from rw mounts{note}",
                     cost_so_far_usd=run.cost_so_far())

    async def _reconnect(self, old: AgentStream) -> AgentStream:
        """The connection dropped mid-stream: the job runs on, detached. Re-attach where we stopped reading.

        While it fails, the provider is asked whether the instance is still there (a spot instance taken away
        raises Preempted). Once the cell is over and only its results are missing, the instance is kept and tried
        again until the cap or the maximum duration says stop (or a cancel's short last chance ends): then what is
        lost is said, in the job view and the ledger."""
        run, job, machine = self.run, self.run.job, self.run.on
        endpoint = machine.running.endpoint
        job.emit(EventType.RECONNECTING, message=f"connection lost; re-attaching at byte {old.offset}")
        timeout = run.parts.reconnect_timeout
        deadline = run.clock.monotonic() + timeout
        delay, next_check = 0.25, 0.0
        last: BaseException | None = None
        while True:
            if job.cancel_requested.is_set():
                # Cancelled during an outage: a short last chance to bring the results back, then tear down
                # (an unconfirmed terminate leaves the state row for `%burst cleanup`).
                deadline = min(deadline, run.clock.monotonic() + CANCEL_RECONNECT_SECONDS)
            try:
                if last is not None:
                    run.check_budget()  # unreachable at the cap or the maximum duration: end it now
                stream = await run.within_budget(lambda: self._attach_again(old.offset))
                stream.exit = old.exit
                return stream
            except StopRequested as stop:
                run.note(f"{STOP_TEXT[stop.reason]} while {endpoint} was unreachable ({last or 'no answer'})")
                run.lost = run.unsynced()
                raise
            except HostKeyError:
                raise  # another host answering on the instance's address is never waited out
            except (ProviderError, OSError, EOFError) as exc:
                last = exc
                if run.clock.monotonic() >= next_check:
                    next_check = run.clock.monotonic() + machine.provider.poll_seconds
                    await self._check_preempted()
                if run.clock.monotonic() + delay > deadline and (old.exit is None or job.cancel_requested.is_set()):
                    what = run.unsynced()
                    raise ConnectFailed(f"lost the connection to {endpoint} and could not get it "
                                        f"back within {timeout:.0f} s: {exc}"
                                        + (f"; not brought back: {what}" if what else "")) from exc
                left = run.limits().seconds_left()  # the pause before the next try never outlasts the cap
                await asyncio.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, 5.0)

    def _attach_again(self, offset: int) -> AgentStream:
        machine = self.run.on
        assert machine.running.endpoint is not None
        self.run.parts.connections.reset(machine.running.endpoint)
        return machine.client().attach(offset)

    async def _check_preempted(self) -> None:
        """Raise Preempted when the provider says the instance was taken away (paused, exited, gone)."""
        machine = self.run.on
        if not machine.rented:
            return  # the user's own machine: unreachable is an outage, never a preemption
        instance_id = machine.running.instance_id
        try:
            current = await machine.provider.get(instance_id)
        except ProviderError:
            return  # the API is down too: keep trying to reconnect
        if current is None:
            raise Preempted(f"{machine.name} instance {instance_id} is gone")
        if current.state in (InstanceState.STOPPED, InstanceState.FAILED):
            raise Preempted(f"{machine.name} instance {instance_id} was {current.detail or current.state.value}")


def read_results(stream: AgentStream, plans: list[MountPlan], *, sink: ResultSink | None, job_id: str,
                 max_bytes: int | None) -> Received:
    """The results from ``stream`` into the rw mounts (and the sink), as the job takes them (its id names conflict
    copies), for the job and its reaper alike. Past ``max_bytes`` the stream is closed, not read to its end."""
    try:
        return stream.read_results(lambda f: receive_results(f, plans, sink=sink, job_id=job_id, max_bytes=max_bytes))
    except ResultsTooLarge as exc:
        stream.close()
        assert isinstance(exc.received, Received)
        return exc.received


def fetch_results(client: AgentClient, receive: Callable[[AgentStream], Received]) -> Received:
    """Ask the agent for the results again, over a channel of their own (blocking): a ``--sync-every`` pull, or a
    fetch after this machine could not write some of them (a full disk), for the job and its reaper alike."""
    stream = client.results()
    try:
        for _ in stream.records():
            pass
        return receive(stream)
    finally:
        stream.close()


def _describe_mounts(mounts: list[MountPlan]) -> str | None:
    return ", ".join(f"{m.mount.local} -> {m.mount.remote}" for m in mounts) or None
