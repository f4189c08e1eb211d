"""The reaper: finishes jobs whose kernel is going away, from a process of its own.

A kernel's exit hooks have about 2.5 s before SIGTERM and SIGKILL, far too little to sync results and confirm a
terminate. So they only start ``python -m burst_jupyter.reaper JOB_ID...`` in a new session (the kernel's
process-group signals miss it), and the reaper does the slow part: stop the job, sync rw mounts back, terminate,
confirm gone, settle the ledger. ``%burst cleanup`` runs the same code in-process for leftovers of dead kernels.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from .agent import LAPSE_ARCHIVE, STOPPING, Control, Kind, Reason
from .budget import Budget
from .errors import BurstError
from .job import cost_of
from .job_run import unsynced
from .keys import remove_job_key
from .meter import WALL_CLOCK, Clock, Meter, utc
from .parts import InstallParts, open_parts
from .paths import burst_home, logs_dir, open_private
from .providers import build_provider
from .providers.base import Capability, terminate_confirmed
from .remote import AgentClient, AgentStream
from .remote_run import REFETCH_SECONDS, fetch_results, read_results
from .sinks import ResultSink, open_sink
from .state import LIVE_STATES, OwnedInstance, StateStore
from .stop_policy import STOP_GRACE_SECONDS, TICK_SECONDS, terminate_reserve
from .sync_back import Received, receive_results, sweep_scratch

__all__ = ["Outcome", "reap", "spawn_reaper"]

log = logging.getLogger("burst_jupyter.reaper")

_RENEW_SECONDS = 1.0  # how often a reaper renews the agent's lease while it stops the cell and syncs


@dataclass(frozen=True)
class Outcome:
    job_id: str
    synced: int  # files brought back
    terminated: bool
    cost_usd: Decimal | None
    problem: str | None = None


def spawn_reaper(job_ids: list[str], *, reason: str) -> int:
    """Start a detached reaper for ``job_ids`` and return its pid. Fast: the kernel may be seconds from death."""
    log_path = logs_dir() / f"reaper-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    with open_private(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "burst_jupyter.reaper", "--reason", reason, *job_ids],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True,
            start_new_session=True,  # out of the kernel's process group: its SIGTERM/SIGKILL miss us
            env={**os.environ, "BURST_HOME": str(burst_home())},
        )
    # Reap it when it ends, so a killed reaper leaves no zombie that still looks alive to `%burst cleanup`.
    threading.Thread(target=proc.wait, name="burst-reaper-wait", daemon=True).start()
    return proc.pid


def reap(owned: list[OwnedInstance], parts: InstallParts, *, reason: str, clock: Clock = WALL_CLOCK) -> list[Outcome]:
    """Finish each job (blocking): stop, sync back, terminate, confirm, settle. Never raises for one job."""

    def run() -> list[Outcome]:
        return asyncio.run(_reap_all(owned, parts, reason=reason, clock=clock))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    # Called on a thread whose loop is running (`%burst cleanup` in a kernel cell): asyncio.run refuses there.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="burst-cleanup") as pool:
        return pool.submit(run).result()


async def _reap_all(owned: list[OwnedInstance], parts: InstallParts, *, reason: str, clock: Clock) -> list[Outcome]:
    return list(await asyncio.gather(*(_reap_safely(o, parts, reason=reason, clock=clock) for o in owned)))


async def _reap_safely(owned: OwnedInstance, parts: InstallParts, *, reason: str, clock: Clock) -> Outcome:
    """One job's failure (no account for its provider any more, an API that is down) never stops the others."""
    try:
        return await _reap_one(owned, parts, reason=reason, clock=clock)
    except (BurstError, OSError) as exc:
        log.error("%s: could not be reaped: %s", owned.job_id, exc)
        return Outcome(owned.job_id, 0, False, None, f"could not be reaped: {exc}")


async def _reap_one(owned: OwnedInstance, parts: InstallParts, *, reason: str, clock: Clock) -> Outcome:
    h, state, budget, connections, home = owned.handoff, parts.state, parts.budget, parts.connections, parts.home
    if h.provider_config is None:
        raise BurstError("its row records no provider configuration")
    provider = build_provider(h.provider_config, connections=connections, home=home)
    instance_id = owned.instance_id
    listed_rate: Decimal | None = None
    if instance_id is None:
        # Handed over between "intent" and "launched": look for it at the provider by this install's tag.
        found = [i for i in await provider.list_owned(h.tag) if i.job_id == owned.job_id]
        if not found:
            return await _settle_unseen(owned, Capability.RENTED in provider.capabilities, state=state,
                                        budget=budget, reason=reason, clock=clock)
        instance_id, listed_rate = found[0].instance_id, found[0].price_usd_per_hour
    # What a reaper killed mid-sync left in the mounts' scratch folders goes, whatever happens next.
    await asyncio.to_thread(sweep_scratch, h.mount_plans())
    meter = Meter(rate=owned.rate_usd_per_hour or listed_rate or Decimal(0), cap=h.max_cost_usd or Decimal(0),
                  since=owned.billing_since.timestamp(), spent=h.spent_usd, clock=clock)
    synced, problem, reached = 0, None, False
    client = h.agent(connections)
    if client is not None:
        try:
            synced, problem = await _stop_and_sync_bounded(owned, client, meter, provider.teardown_seconds)
            reached = True
        except _GaveUp as exc:
            # The instance is ended through the provider's API below: the wait on the agent is over.
            reached = True  # the sink holds nothing of this job's: the agent was not the one that ended it
            lost = exc.missing or unsynced(h.mount_plans(), [])
            problem = f"{exc}" + (f"; not brought back: {lost}" if lost else "")
            log.warning("%s: %s", owned.job_id, problem)
        except (BurstError, OSError, EOFError) as exc:
            problem = f"sync back failed: {exc}"
            log.warning("%s: %s", owned.job_id, problem)
    if not reached:
        try:
            restored = await asyncio.to_thread(_restore_lapse, owned)
        except (BurstError, OSError, EOFError) as exc:
            log.warning("%s: no results from the result sink either: %s", owned.job_id, exc)
            restored = None
        if restored is not None:
            synced, problem = restored, None
            log.info("%s: brought back %d file(s) the agent stored in the result sink", owned.job_id, restored)
    gone = await terminate_confirmed(provider, instance_id, timeout=120)
    if gone is not None:
        problem = f"terminate not confirmed: {gone}"
        log.error("%s: %s", owned.job_id, problem)
        return Outcome(owned.job_id, synced, False, None, problem)
    await asyncio.to_thread(state.mark_terminated, owned.job_id)
    await asyncio.to_thread(remove_job_key, home / "keys", owned.job_id)
    # This attempt's row, from its create request at the last known rate (never under), on the wall clock the
    # provider bills on; earlier attempts of the job (preempted, never booted) were billed on rows of their own
    # when they ended. A marketplace instance whose rate nobody recorded (a row from before the intent carried
    # it) bills at the listed rate, else its cost is unknown: never $0.
    now = utc(clock.time())
    cost = meter.attempt_cost() if meter.rate or Capability.RENTED not in provider.capabilities else None
    await asyncio.to_thread(
        budget.settle, owned.job_id, provider=owned.provider, instance_id=instance_id,
        gpu=h.gpu or "", rate_usd_per_hour=meter.rate, started_at=owned.billing_since, ended_at=now,
        actual_usd=cost, status="cancelled", name=h.name,
        message=f"{reason}; finished by the reaper" + (f"; {problem}" if problem else ""), attempt=h.attempt)
    log.info("%s: synced %d file(s), terminated, settled %s", owned.job_id, synced, cost)
    return Outcome(owned.job_id, synced, True, cost, problem)


async def _settle_unseen(owned: OwnedInstance, bills_from_launch: bool, *, state: StateStore, budget: Budget,
                         reason: str, clock: Clock) -> Outcome:
    """A row whose create may have been sent (its kernel died during it) and whose provider lists no instance of
    the job. Either nothing was made, or the instance was made and is gone: its boot watchdog ended it
    (providers/_boot_watchdog.py), at the latest when the job's money ran out. Which, nobody can tell, so a
    marketplace's is billed as made: at the rate recorded with the intent, from the create request until now,
    at most the job's cap, on a ``leaked`` row that the daily and weekly caps count. Nothing rented, or no rate
    recorded: abandoned, and the reservation released."""
    h, rate = owned.handoff, owned.rate_usd_per_hour
    if not (bills_from_launch and rate):
        await asyncio.to_thread(state.mark_abandoned, owned.job_id)
        await asyncio.to_thread(budget.release, owned.job_id)
        return Outcome(owned.job_id, 0, True, None)
    launched, now = owned.billing_since, utc(clock.time())
    cost = cost_of(rate, (now - launched).total_seconds())
    if h.max_cost_usd is not None:
        cost = min(cost, h.max_cost_usd)
    await asyncio.to_thread(state.mark_terminated, owned.job_id)
    await asyncio.to_thread(
        budget.settle, owned.job_id, provider=owned.provider, instance_id=None, gpu=h.gpu or "",
        rate_usd_per_hour=rate, started_at=launched, ended_at=now, actual_usd=cost, status="leaked",
        name=h.name, message=f"{reason}: its kernel died during the create, and {owned.provider} lists no "
        "instance of it (never made, or it ended itself): billed as made, until now, at most the cap",
        attempt=h.attempt)
    log.info("%s: no instance found; billed %s as if one was made", owned.job_id, cost)
    return Outcome(owned.job_id, 0, True, cost)


class _GaveUp(Exception):
    """The reaper stops waiting on the agent: the instance is ended through the provider's API instead.
    ``missing``: what the sync had found it could not bring back so far (None: nothing known yet)."""

    def __init__(self, why: str, missing: str | None) -> None:
        super().__init__(why)
        self.missing = missing


@dataclass
class _SyncWatch:
    """What the reaper's wait and its sync thread tell each other."""

    confirmed: threading.Event = field(default_factory=threading.Event)  # the agent said the cell stops or is over
    abandoned: threading.Event = field(default_factory=threading.Event)  # the wait is over: stop asking for results
    missing: str | None = None  # results this machine could not write yet (a full disk), as got.missing() says


async def _stop_and_sync_bounded(owned: OwnedInstance, client: AgentClient, meter: Meter,
                                 teardown_seconds: float) -> tuple[int, str | None]:
    """:func:`_stop_and_sync`, waited on only while the agent confirms the stop within the grace and the cap and the
    maximum duration allow: a frozen instance or agent is never waited out, the lease renewed meanwhile. Raises
    :class:`_GaveUp` when the wait ends first (the thread is left to the terminate, which breaks its connection)."""
    watch = _SyncWatch()
    done = _in_thread(lambda: _stop_and_sync(owned, client, watch), name=f"burst-reaper-{owned.job_id}")
    grace_over = meter.clock.monotonic() + STOP_GRACE_SECONDS
    ends = owned.handoff.ends_at
    while not done.done():
        why = None
        if not watch.confirmed.is_set() and meter.clock.monotonic() > grace_over:
            why = f"the agent did not confirm the stop within {STOP_GRACE_SECONDS:.0f} s"
        elif meter.exhausted(reserve=terminate_reserve(teardown_seconds)):
            why = f"the cap ({meter.cap}) leaves only the terminate"
        elif ends is not None and meter.clock.time() > ends:
            why = "the maximum duration is over"
        if why is not None:
            watch.abandoned.set()
            raise _GaveUp(why, watch.missing)
        await asyncio.wait([done], timeout=TICK_SECONDS)
    return done.result()


def _in_thread(call: Callable[[], tuple[int, str | None]], *, name: str) -> asyncio.Future[tuple[int, str | None]]:
    """``call()`` on a daemon thread (``asyncio.to_thread`` would make the loop's end wait for a thread blocked on
    a frozen instance)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[int, str | None]] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            value = call()
        except BaseException as exc:  # handed to the awaiting side as is
            error = exc
            loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(settle, lambda: future.set_result(value))

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _stop_and_sync(owned: OwnedInstance, client: AgentClient, watch: _SyncWatch) -> tuple[int, str | None]:
    """Stop the cell, bring its rw results back (and into the result sink). Returns (files, sink problem).
    ``watch.confirmed`` is set once the agent has said that the cell is stopping or over.

    One ``attach`` does it all: its first line renews the agent's lease and a renewal follows every second until
    the results are in, so the agent's dead-man's switch never ends the instance under a reaper still syncing.
    Results this machine could not write (a full disk) are asked for again every few seconds, the instance kept
    with them, until they land or the wait is abandoned (the cap, the maximum duration), as the job itself does."""
    h = owned.handoff
    status = client.status()
    if not status.get("exists"):
        watch.confirmed.set()
        return 0, None
    if status.get("exit") is not None:
        watch.confirmed.set()
    stream = client.attach(int(status.get("log_end") or 0))  # no past output needed: the end, then the results
    stream.send(Control.LEASE)
    stream.send(f"{Control.STOP} {Reason.CANCELLED}")  # ignored by an agent whose cell has ended already
    done = threading.Event()

    def renew() -> None:
        while not done.wait(_RENEW_SECONDS):
            try:
                stream.send(Control.LEASE)
            except (OSError, EOFError, BurstError):
                return  # the connection broke: reading the stream fails too and says why

    renewer = threading.Thread(target=renew, name=f"burst-reaper-lease-{owned.job_id}", daemon=True)
    renewer.start()
    try:
        for record in stream.records():  # the whole log up to the exit record: the cell has stopped once it ends
            if record.get("k") == Kind.EXIT or str(record.get("m", "")).startswith(STOPPING):
                watch.confirmed.set()
        plans = h.mount_plans()
        sink, problem = _handoff_sink(h.result_sink)

        def receive(results: AgentStream) -> Received:
            return read_results(results, plans, sink=sink, job_id=owned.job_id, max_bytes=h.max_results)

        got = receive(stream)
        while got.unwritten:
            watch.missing = got.missing()
            log.warning("%s: kept the instance with results this machine could not write (%s); asking again every "
                        "%.0f s until the cap", owned.job_id, watch.missing, REFETCH_SECONDS)
            if watch.abandoned.wait(REFETCH_SECONDS):
                break
            got = fetch_results(client, receive)
        if sink is not None:
            log.info("%s: stored %d file(s) in %s", owned.job_id, got.stored, sink.describe())
        for note in got.notes:
            log.warning("%s: %s", owned.job_id, note)
        missing = got.missing()
        return len(got.files), "; ".join(p for p in (problem, got.sink_note, missing and f"not brought back: {missing}")
                                         if p) or None
    finally:
        done.set()
        renewer.join(5)
        client.release()


def _restore_lapse(owned: OwnedInstance) -> int | None:
    """The instance is out of reach (its agent ended it when the lease lapsed, or it is gone): what that agent
    uploaded to the result sink lands in the rw mounts as a sync back would have put it. The number of files, or
    None when the sink holds nothing of this job's."""
    sink, _ = _handoff_sink(owned.handoff.result_sink)
    if sink is None:
        return None
    plans = owned.handoff.mount_plans()
    with tempfile.TemporaryDirectory(prefix="burst-lapse-") as tmp:
        archive = Path(tmp) / LAPSE_ARCHIVE
        if not sink.fetch(LAPSE_ARCHIVE, archive):
            return None
        with open(archive, "rb") as f:
            return len(receive_results(f, plans, job_id=owned.job_id).files)


def _handoff_sink(url: str | None) -> tuple[ResultSink | None, str | None]:
    """The job's result sink, reopened from the URL session.plan() put in the handoff (already job-specific)."""
    if url is None:
        return None, None
    try:
        return open_sink(url), None
    except BurstError as exc:  # e.g. R2_ACCOUNT_ID not in this process's environment: still sync locally
        log.warning("result sink %s: %s", url, exc)
        return None, f"result sink not used: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m burst_jupyter.reaper")
    parser.add_argument("--reason", default="kernel exit")
    parser.add_argument("job_ids", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    parts = open_parts(burst_home())
    try:
        owned = [o for o in map(parts.state.get, args.job_ids) if o is not None and o.state in LIVE_STATES]
        log.info("reaping %s (%s)", ", ".join(o.job_id for o in owned) or "nothing", args.reason)
        outcomes = reap(owned, parts, reason=args.reason)
    finally:
        parts.close()
    return 0 if all(o.terminated for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
