"""Reconciliation, the fourth layer against a leaked instance: ask each provider what carries this install's tag,
compare with the state store, and end what no live job owns.

It runs on ``%load_ext`` (in a daemon thread, so the load waits on no network), in ``burst cleanup``,
``%burst cleanup`` and ``burst.cleanup()``, and every ``reconcile_interval_seconds`` while a session has live jobs.
Each instance a provider lists, and each live row of the state store, is one of:

- a live job's: its row is intent or launched and its process (or the reaper it was handed to) is alive. Never
  touched. A launch in flight has no instance id recorded yet, so an instance that carries no job id is left
  alone while any live launch at that provider has none.
- stranded: its row is live, but its process is gone (or, in this process, its job ended without a confirmed
  terminate) and no reaper holds it; or it was handed to a reaper that is gone, whether or not the kernel that
  handed it over still lives (that kernel never touches a handed-off job again). Finished by
  :func:`reaper.reap`: stop, sync back, terminate, settle; a row whose instance is already gone ends up
  terminated and settled the same way.
- leaked: no row knows it, or its row says terminated or abandoned (a lost create reply, a terminate that did not
  take). Ended with ``terminate_confirmed``; its row, if any, is marked terminated; and when its job has no ledger
  row yet, one is settled with status ``leaked`` at the listed rate from the provider's creation time.

A provider that does not answer is reported; the others are still reconciled. ``local`` is asked only when it has
job folders (one subprocess, no network); ``ssh`` is not asked (that would mean connecting to every box of every
job), but its stranded rows are still finished from what the row recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .errors import one_line
from .paths import has_local_jobs, open_private, private_dir
from .processes import pid_alive
from .providers.base import Capability
from .reconcile_report import Finding, Report
from .state import LIVE_STATES

if TYPE_CHECKING:
    from .config import Settings
    from .parts import InstallParts
    from .providers import ProviderConfig
    from .providers.base import Instance, Provider
    from .reaper import Outcome
    from .state import OwnedInstance, StateStore

__all__ = [
    "AT_LOAD",
    "CLEANUP",
    "WHILE_JOBS_RUN",
    "PassHost",
    "Reconciler",
    "announce",
    "periodic_pass",
    "providers_to_ask",
    "run_in_session",
    "start_background",
    "take_unseen",
    "wait_background",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

AT_LOAD = "reconciled at load"
CLEANUP = "burst cleanup"
WHILE_JOBS_RUN = "reconciled while jobs ran"

_LIST_TIMEOUT = 120.0  # one provider's whole listing, its own retries included
_TERMINATE_TIMEOUT = 120.0  # as long as the reaper waits for a confirmed terminate
_LOG_NAME = "reconcile.log"


@dataclass
class Reconciler:
    """One pass over ``providers`` against the state store, from plain parts: a session and the load-time thread
    each bring their own."""

    parts: InstallParts
    providers: Mapping[str, Provider]
    #: Jobs of this process that have ended: a live row of theirs has nobody left to finish it.
    finished: Collection[str] = ()

    @property
    def state(self) -> StateStore:
        return self.parts.state

    async def run(self, *, reason: str, dry_run: bool = False) -> Report:
        at = dt.datetime.now(dt.timezone.utc)
        listed, errors = await self._list_all()
        # The store is read after the listing: every instance listed was created after its job's intent row.
        live = await self._db(self.state.live)
        protected = 0
        leaks: list[tuple[str, Instance, OwnedInstance | None]] = []
        for name, instances in listed.items():
            for inst in instances:
                verdict, row = await self._db(self._classify, name, inst, live)
                if verdict == "live":
                    protected += 1
                elif verdict == "leaked":
                    leaks.append((name, inst, row))
        stranded = [o for o in live if self._stranded(o)]
        report = Report(reason=reason, dry_run=dry_run, at=at, asked=tuple(self.providers), protected=protected,
                        errors=errors)
        if dry_run:
            findings = [self._stranded_finding(o, at, errors) for o in stranded]
            findings += [self._leak_finding(name, inst, row, at) for name, inst, row in leaks]
            return replace(report, findings=tuple(findings))
        reaped, ended = await asyncio.gather(self._reap(stranded, at, errors, reason),
                                             asyncio.gather(*(self._end(name, inst, at, reason)
                                                              for name, inst, _ in leaks)))
        return replace(report, findings=(*reaped, *(f for f in ended if f is not None)))

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(call, *args)

    # -- asking ---------------------------------------------------------------------------------------------

    async def _list_all(self) -> tuple[dict[str, list[Instance]], dict[str, str]]:
        names = list(self.providers)
        answers = await asyncio.gather(*(asyncio.wait_for(self.providers[n].list_owned(self.parts.tag), _LIST_TIMEOUT)
                                         for n in names), return_exceptions=True)
        listed: dict[str, list[Instance]] = {}
        errors: dict[str, str] = {}
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, asyncio.TimeoutError):
                errors[name] = f"no answer in {_LIST_TIMEOUT:.0f} s"
            elif isinstance(answer, Exception):
                errors[name] = one_line(answer, about=name)
                log.info("%s: could not list owned instances: %s", name, errors[name])
            elif isinstance(answer, BaseException):
                raise answer
            else:
                listed[name] = answer
        return listed, errors

    # -- classifying ----------------------------------------------------------------------------------------

    def _stranded(self, o: OwnedInstance) -> bool:
        """A live row nobody will finish: its process is gone, or its job here has ended; and no reaper other
        than this process (an earlier pass, serialized by ``_busy``) holds it."""
        if o.state not in LIVE_STATES:
            return False
        if o.reaper_pid is not None and o.reaper_pid != os.getpid():
            # Handed off: its kernel let go of it (and stays away, alive or not); the reaper alone finishes it.
            return not pid_alive(o.reaper_pid)
        return o.job_id in self.finished or not o.owner.is_alive()

    def _classify(self, name: str, inst: Instance, live: list[OwnedInstance]) -> tuple[str, OwnedInstance | None]:
        """("live" | "stranded" | "leaked", the row that knows the instance, if any)."""
        row = self.state.get(inst.job_id) if inst.job_id else None
        if row is None or row.state not in LIVE_STATES:
            row = next((o for o in live if o.provider == name and o.instance_id == inst.instance_id), row)
        if row is not None and row.state in LIVE_STATES:
            return ("stranded" if self._stranded(row) else "live"), row
        if inst.job_id is None and any(o.provider == name and o.instance_id is None and not self._stranded(o)
                                       for o in live):
            return "live", None  # a launch in flight there has recorded no id yet: this may be its instance
        return "leaked", row

    # -- stranded rows: the reaper's work -------------------------------------------------------------------

    def _stranded_finding(self, o: OwnedInstance, at: dt.datetime, errors: Mapping[str, str]) -> Finding:
        from .job import cost_of
        from .providers import is_marketplace

        rate, since = o.rate_usd_per_hour, o.billing_since
        cost = None if rate is None else cost_of(rate, (at - since).total_seconds())
        gone = "its job here has ended" if o.job_id in self.finished else \
            f"its process (pid {o.owner.pid} on {o.owner.host}) is gone"
        if o.reaper_pid is not None and o.reaper_pid != os.getpid():
            gone = f"the reaper it was handed to (pid {o.reaper_pid}) is gone"
        problem = None
        if is_marketplace(o.provider) and o.provider not in self.providers:
            problem = f"no {o.provider} account here"
        elif o.provider in errors:
            problem = f"{o.provider} could not be asked"
        return Finding(o.provider, o.instance_id, o.job_id, "stranded", gone, rate, since, cost, problem=problem)

    async def _reap(self, stranded: list[OwnedInstance], at: dt.datetime, errors: Mapping[str, str],
                    reason: str) -> list[Finding]:
        findings = {o.job_id: self._stranded_finding(o, at, errors) for o in stranded}
        ids = [j for j, f in findings.items() if f.problem is None]
        if ids:
            # Claim them, so that a pass in another process leaves them alone; keep what is still ours after.
            me = os.getpid()
            await self._db(self.state.hand_to_reaper, ids, me)
            rows = await self._db(lambda: [self.state.get(j) for j in ids])
            mine = [o for o in rows if o is not None and o.reaper_pid == me and o.state in LIVE_STATES]
            for j in set(ids) - {o.job_id for o in mine}:
                del findings[j]  # another process took it between our reads
            outcomes = await asyncio.gather(*(asyncio.to_thread(self._reap_row, o, reason) for o in mine))
            for o, out in zip(mine, outcomes, strict=True):
                f = findings[o.job_id]
                why = f.why + (f"; synced back {out.synced} file(s)" if out.synced else "")
                if out.terminated and out.problem:
                    why += f"; {out.problem}"
                findings[o.job_id] = replace(f, why=why, ended=out.terminated, cost_usd=out.cost_usd,
                                             problem=None if out.terminated else out.problem)
        return list(findings.values())

    def _reap_row(self, o: OwnedInstance, reason: str) -> Outcome:
        """The reaper's work on one row (in a thread; a failure comes back as the outcome's problem)."""
        from .reaper import reap

        (outcome,) = reap([o], self.parts, reason=reason)
        return outcome

    # -- leaked instances -----------------------------------------------------------------------------------

    def _leak_finding(self, name: str, inst: Instance, row: OwnedInstance | None, at: dt.datetime) -> Finding:
        from .job import cost_of

        if inst.job_id is None:
            why = "carries this install's tag but no job id"
        elif row is None:
            why = "not in the state store (a lost create reply?)"
        elif row.state == "abandoned":
            why = "its launch was recorded as failed, but the instance was made"
        else:
            why = "its job ended, but the instance was still there"
        rate: Decimal | None = inst.price_usd_per_hour
        if not rate and Capability.RENTED in self.providers[name].capabilities:
            # A marketplace listing $0/h does not know the rate (a Thunder SKU gone from its price table).
            rate = row.rate_usd_per_hour if row else None
        # An instance whose provider reports no creation time (RunPod) was given "now" when the listing was read
        # (providers/base.py), after ``at``, the moment the pass began: then it billed since its row's create
        # request, where a row knows it, and for an unknown time otherwise.
        since = inst.created_at if inst.created_at < at else (row.billing_since if row else None)
        cost = None if rate is None or since is None else cost_of(rate, (at - since).total_seconds())
        return Finding(name, inst.instance_id, inst.job_id, "leaked", why, rate, since, cost)

    async def _end(self, name: str, inst: Instance, at: dt.datetime, reason: str) -> Finding | None:
        """End one leaked instance; None when, looked at again, it is a live job's or gone already."""
        from .job import cost_of
        from .keys import remove_job_key
        from .providers.base import terminate_confirmed

        provider = self.providers[name]
        live = await self._db(self.state.live)
        verdict, row = await self._db(self._classify, name, inst, live)
        if verdict != "leaked":
            return None
        finding = self._leak_finding(name, inst, row, at)
        try:
            if await provider.get(inst.instance_id) is None:
                return None  # ended meanwhile (the listing was older than the job's own terminate)
        except Exception as exc:
            return replace(finding, problem=one_line(exc))
        problem = await terminate_confirmed(provider, inst.instance_id, timeout=_TERMINATE_TIMEOUT)
        if problem is not None:
            log.info("%s %s: terminate not confirmed: %s", name, inst.instance_id, problem)
            return replace(finding, problem=f"terminate not confirmed: {one_line(problem)}")
        ended_at = dt.datetime.now(dt.timezone.utc)
        rate, since = finding.rate_usd_per_hour, finding.since
        cost = None if rate is None or since is None else cost_of(rate, (ended_at - since).total_seconds())
        finding = replace(finding, ended=True, cost_usd=cost)
        if row is not None:
            await self._db(self.state.mark_terminated, row.job_id)
        if inst.job_id is not None and (row is None or not row.owner.is_alive()):
            # (A live owner may be about to launch the job's next attempt with that key; it removes it itself.)
            await asyncio.to_thread(remove_job_key, self.parts.home / "keys", inst.job_id)
        if Capability.RENTED in provider.capabilities:
            await asyncio.to_thread(self._settle, finding, inst, row, ended_at, reason)
        log.info("%s %s (job %s) ended: leaked, %s", name, inst.instance_id, inst.job_id, finding.why)
        return finding

    def _settle(self, f: Finding, inst: Instance, row: OwnedInstance | None, ended_at: dt.datetime,
                reason: str) -> None:
        """A ledger row for what the leak billed, unless its job has one already: a job that settled billed its
        instances until their terminate was confirmed, and a second row would count that time twice."""
        job_id = inst.job_id or f"{f.provider}-{inst.instance_id}"
        if any(r.job_id == job_id for r in self.parts.budget.rows()):
            return
        self.parts.budget.settle(
            job_id, provider=f.provider, instance_id=inst.instance_id, gpu=inst.gpu_model or "",
            rate_usd_per_hour=f.rate_usd_per_hour or Decimal(0), started_at=f.since or ended_at, ended_at=ended_at,
            actual_usd=f.cost_usd, status="leaked", name=row.handoff.name if row else None,
            message=f"leaked: {f.why}; ended by {reason}", attempt=row.handoff.attempt if row is not None else 1)


# -- which providers --------------------------------------------------------------------------------------------


def providers_to_ask(settings: Settings, build: Callable[[ProviderConfig], Provider],
                     home: Path) -> dict[str, Provider]:
    """Every marketplace with an account, and ``local`` when it has job folders."""
    from .providers import ProviderConfig
    from .providers.accounts import accounts

    found = {name: build(ProviderConfig(name=name)) for name in accounts(settings)}
    if has_local_jobs(home):
        found["local"] = build(ProviderConfig(name="local"))
    return found


# -- passes: in a session, on their own, and what the notebook is told ------------------------------------------

_busy = threading.Lock()  # one pass at a time in this process: load-time thread, cleanup, periodic task
_unseen_lock = threading.Lock()
_unseen: list[Report] = []
_background: threading.Thread | None = None


class PassHost(Protocol):
    """What a pass in a session needs of it (a :class:`~burst_jupyter.session.Session`)."""

    home: Path

    def reconciler(self) -> Reconciler: ...

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T: ...


async def _session_pass(host: PassHost, *, reason: str, dry_run: bool = False) -> Report:
    return await host.reconciler().run(reason=reason, dry_run=dry_run)


def run_in_session(host: PassHost, *, dry_run: bool = False, reason: str = CLEANUP) -> Report:
    """Blocking (Ctrl-C cancels): after the load-time pass, and what it found is printed, one pass on the
    session's loop."""
    wait_background()
    announce()
    while not _busy.acquire(timeout=0.2):
        pass
    try:
        report = host.run_sync(_session_pass(host, reason=reason, dry_run=dry_run))
    finally:
        _busy.release()
    _record(report, host.home)
    return report


async def periodic_pass(host: PassHost) -> None:
    """One pass from the session's periodic task. Never raises: the next one tries again."""
    if not _busy.acquire(blocking=False):
        return  # a cleanup or the load-time pass is at it right now
    try:
        report = await _session_pass(host, reason=WHILE_JOBS_RUN)
    except Exception as exc:
        log.exception("reconciliation while jobs ran failed")
        report = Report(WHILE_JOBS_RUN, False, dt.datetime.now(dt.timezone.utc), errors={"reconcile": one_line(exc)})
    finally:
        _busy.release()
    await asyncio.to_thread(_record, report, host.home, tell=True)


def start_background() -> threading.Thread:
    """``%load_ext``: one pass in a daemon thread with parts of its own (the load itself waits on no network)."""
    global _background
    thread = threading.Thread(target=_background_pass, name="burst-reconcile", daemon=True)
    _background = thread
    thread.start()
    return thread


def wait_background() -> None:
    """Wait for the load-time pass (in slices, so Ctrl-C gets through), so that no cleanup runs beside it."""
    thread = _background
    while thread is not None and thread.is_alive():
        thread.join(0.2)


def _background_pass() -> None:
    from .paths import burst_home

    home = burst_home()
    try:
        with _busy:
            report = _standalone_pass(home)
    except Exception as exc:  # nobody to raise to in this thread: the log and the next %burst say it
        log.exception("reconciliation at load failed")
        report = Report(AT_LOAD, False, dt.datetime.now(dt.timezone.utc), errors={"reconcile": one_line(exc)})
    _record(report, home, tell=True)


def _standalone_pass(home: Path) -> Report:
    from .config import load_settings
    from .parts import open_parts
    from .providers import build_provider

    settings = load_settings(project=False)  # accounts only: the user's, whatever this folder's pyproject says
    parts = open_parts(home)
    try:
        providers = providers_to_ask(
            settings, lambda cfg: build_provider(cfg, connections=parts.connections, home=home, settings=settings),
            home)

        async def run() -> Report:
            try:
                return await Reconciler(parts, providers).run(reason=AT_LOAD)
            finally:
                await asyncio.gather(*(p.aclose() for p in providers.values()), return_exceptions=True)

        return asyncio.run(run())
    finally:
        parts.close()


def _record(report: Report, home: Path, *, tell: bool = False) -> None:
    """With ``tell``, keep the report for the notebook if eventful; then append it to BURST_HOME/logs/reconcile.log
    (in that order: whoever sees it in the log finds it kept)."""
    if tell and report.eventful:
        with _unseen_lock:
            _unseen.append(report)
    with contextlib.suppress(OSError):  # a full disk must not fail the pass that did the work
        logs = private_dir(home / "logs")
        with open_private(logs / _LOG_NAME, "a", encoding="utf-8") as out:
            out.write(f"{report.at.astimezone():%Y-%m-%d %H:%M:%S} pid {os.getpid()} {report}\n")


def take_unseen() -> list[Report]:
    """The eventful reports of passes nobody asked for (at load, while jobs ran) not shown yet; forgets them."""
    with _unseen_lock:
        taken = list(_unseen)
        _unseen.clear()
    return taken


def announce() -> None:
    """Print, once, what passes nobody asked for found (the next ``%burst`` or ``burst.cleanup()`` calls this)."""
    for report in take_unseen():
        print(f"burst: {report}")
