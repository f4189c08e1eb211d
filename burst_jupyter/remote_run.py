"""Following the job on its instance (:class:`RemoteRun`): upload and start the agent, then stream its records
until the results are in, renewing the lease, sending stops, pulling --sync-every changes, fetching results again
that this machine could not write, reconnecting, and telling a preemption from an outage."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .agent import STOPPING, Control, Kind, Reason
from .errors import (
    BurstError,
    ConnectFailed,
    HostKeyError,
    Preempted,
    ProviderError,
    RemoteError,
    RemoteSetupError,
    ResultsTooLarge,
    SyncError,
    UnsafeResults,
    one_line,
)
from .events import EventType
from .lifecycle_state import StopRequested
from .output import RemoteDisplay
from .protection import dead_mans_switch, protection
from .providers.base import Capability, InstanceState
from .providers.catalog import ANY, CATALOG
from .remote import AgentClient, AgentStream, Record
from .stop_policy import STOP_TEXT, TICK_SECONDS, StopPolicy
from .sync import MountPlan, write_bundle
from .sync_back import Received, receive_results

if TYPE_CHECKING:
    from .sinks import ResultSink

__all__ = ["REFETCH_SECONDS", "RemoteRun", "fetch_results", "read_results"]

_MAX_RECONNECTS = 20
_CANCEL_RECONNECT_SECONDS = 15.0
# Results this machine could not write (a full disk) stay on the kept instance; asked for again this often.
REFETCH_SECONDS = 5.0


class RemoteRun(StopPolicy):
    """The job on a ready instance, from the upload to its results."""

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
            "cell_file": spec.cell_file,
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
        guard = protection(self.chosen, plan.sink, lease_seconds=plan.spec.lease_seconds, max_seconds=plan.max_seconds)
        job.emit(EventType.PROTECTED, message=guard.summary, text=guard.describe())
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
                kind, payload = await asyncio.wait_for(queue.get(), timeout=TICK_SECONDS)
            except asyncio.TimeoutError:
                kind, payload = "tick", None
            if kind == "record":
                self._on_record(payload)
                if payload.get("k") == Kind.EXIT and payload.get("reason") == Reason.AGENT_DIED:
                    await self._check_preempted()  # a container stopped under the agent: taken away, or a crash
            elif kind == "results":
                await self._on_results(payload)
                if not payload.unwritten:
                    return
                refetch_at = self.clock.monotonic() + REFETCH_SECONDS  # kept, with its results, until the cap
            elif kind == "refetch-failed":
                refetch_at = self.clock.monotonic() + REFETCH_SECONDS
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
                raise StopRequested(Reason.CANCELLED)  # a reaper owns the instance now: hands off
            now = self.clock.monotonic()
            if lease_every and now - last_lease >= lease_every:
                # Also while the results come back: the agent's watchdog outlives the cell until they are fetched.
                last_lease = now
                await self._send(stream, Control.LEASE)
            end = self._must_end()
            if end is not None:
                raise self._end_now(end)
            if self.exit_record is not None:
                if self.received is not None and self.received.unwritten:
                    # Waiting on this machine's disk, never past the cap, the maximum duration or a cancel.
                    reason = self._should_stop()
                    if reason is not None:
                        self.lost = self.received.missing()
                        raise StopRequested(reason)
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
                    job.emit(EventType.STOPPING, message=STOP_TEXT[reason], cost_so_far_usd=self.cost_so_far())
                    await self._send(stream, f"{Control.STOP} {reason}")
            elif self.stop_reason != Reason.CANCELLED and self.cancel_by is None and self.job.cancel_requested.is_set():
                # Cancelled while another stop is under way: a short last chance for the results, then the end.
                self.cancel_by = self.clock.monotonic() + _CANCEL_RECONNECT_SECONDS
                job.emit(EventType.STOPPING, message=f"cancelled while stopping; the instance is ended within "
                         f"{_CANCEL_RECONNECT_SECONDS:.0f} s", cost_so_far_usd=self.cost_so_far())

    async def _send(self, stream: AgentStream, line: str) -> None:
        try:
            await asyncio.to_thread(stream.send, line)
        except OSError:
            pass  # the connection is dropping; the reader notices and we re-attach

    def _receive(self, stream: AgentStream) -> Received:
        """The results from ``stream`` into the rw mounts (and the sink), one transfer at a time."""
        with self.sync_lock:
            return read_results(stream, self.plan.mounts, sink=self.plan.sink, job_id=self.job.id,
                                max_bytes=self.plan.spec.max_results_bytes)

    async def _on_results(self, got: Received) -> None:
        """Results landed: keep them, tell what did not land as sent, and record what is here now."""
        self.received = got
        self._say(got.notes)
        if got.unwritten:
            self._say([f"the instance is kept with these results and asked again every {REFETCH_SECONDS:.0f} s "
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
            self.plan.handoff.mounts = mounts
            self.state.update_handoff(self.job.id, mounts=mounts)

        await asyncio.to_thread(record)

    def _fetch_results(self) -> Received:
        """The rw changes so far (and into the sink), over a channel of its own beside the stream (blocking)."""
        return fetch_results(self._client(), self._receive)

    def _start_refetch(self, queue: asyncio.Queue[tuple[str, Any]], loop: asyncio.AbstractEventLoop) -> None:
        def fetch() -> None:
            try:
                result: tuple[str, Any] = ("results", self._fetch_results())
            except (BurstError, OSError, EOFError) as exc:
                result = ("refetch-failed", exc)
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
        try:
            got = await asyncio.to_thread(self._fetch_results)
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
            except StopRequested as stop:
                self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {STOP_TEXT[stop.reason]} while "
                              f"{self.instance.endpoint} was unreachable ({last or 'no answer'})\n")
                self.lost = self._unsynced()
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
                    what = self._unsynced()
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
        if Capability.RENTED not in self.chosen.capabilities:
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
        if k == Kind.OUT:  # the instance's data, shown inert: a stream of the two, text bounded by the job
            job.remote_output("stderr" if r.get("s") == "stderr" else "stdout", str(r.get("d", "")))
        elif k == Kind.RESULT and isinstance(r.get("data"), dict):
            self.shown = RemoteDisplay(r["data"])
        elif k == Kind.PROGRESS:
            job.emit(EventType.PROGRESS, percent=r.get("p"), message=r.get("m"))
        elif k == Kind.STARTED:
            self.started = True
            job.emit(EventType.STARTED, instance_id=self.instance.instance_id if self.instance else None)
        elif k == Kind.ERROR:
            self.remote_error = RemoteError(str(r.get("ename")), str(r.get("evalue", "")), list(r.get("tb") or []))
        elif k == Kind.SETUP_ERROR:
            self.setup_error = str(r.get("m"))
        elif k == Kind.NOTE and str(r.get("m", "")).startswith(STOPPING):
            self.stop_confirmed = True
            if self.stop_reason is None:
                self.stop_reason = str(r["m"]).removeprefix(STOPPING)
                job.emit(EventType.STOPPING, message=STOP_TEXT.get(self.stop_reason, self.stop_reason))
        elif k == Kind.EXIT:
            self.exit_record, self.stop_confirmed = r, True
            job.emit(EventType.SYNCING_DOWN, message=_describe_mounts([m for m in self.plan.mounts if m.rw]))


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
