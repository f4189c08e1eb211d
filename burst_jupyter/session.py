"""One Session per process: the library's own asyncio loop (in a daemon thread), the state store, the budget,
the connection pool, the providers, and every job this process started.

The kernel already runs an event loop, so the Session runs its own in a thread, as IPython's ``%%script``
does; blocking callers submit coroutines to it and wait in short slices so Ctrl-C still gets through.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import itertools
import re
import secrets
import threading
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .config import Settings, budget_caps, load_settings
from .errors import ConfigError
from .handoff import Handoff
from .job import Job, JobPlan, JobResult, OnMachine, decide_cap
from .job_log import JobLogWriter
from .lifecycle import Lifecycle
from .machine import JobParts
from .meter import WALL_CLOCK, Clock
from .money import format_rate, format_usd
from .offer_book import OfferBook, SearchResult
from .options import FLAGS, JOB_OPTIONS, PLACEMENT
from .output import output_log_path
from .paths import burst_home, secure_home
from .providers import REGISTRY, ProviderConfig, build_provider, is_marketplace, marketplaces, offering
from .providers.accounts import accounts, require_account
from .providers.base import Capability, Offer, OfferQuery, OfferRef, Provider
from .providers.catalog import ANY, canonical_gpu
from .sinks import open_sink
from .spec import HARD_MAX_MINUTES, JobSpec
from .sync import plan_mounts
from .variables import check_pulls, pack_push

if TYPE_CHECKING:
    from .budget import Budget
    from .connections import Connections
    from .kept import KeptMachine, MachinesTable
    from .kept_cell import CellOnMachine
    from .reconcile import Reconciler
    from .state import Owner, StateStore

__all__ = ["PROVIDER_NAMES", "DryRun", "DryRunOnMachine", "Session"]

T = TypeVar("T")

#: The provider names a user can ask for. ``auto`` picks among the configured ones.
PROVIDER_NAMES = ("auto", *REGISTRY)


#: What a kept machine decides for all its cells: a cell on it that gives one is refused, saying so.
_MACHINE_OWNS = frozenset({"max_cost_usd", "retries", "sync_every_seconds", "result_sink", "lease_seconds"})


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:24] or "job"


class Session:
    _current: Session | None = None
    _current_lock = threading.Lock()

    def __init__(self, *, settings: Settings | None = None, home: Path | None = None) -> None:
        from .parts import open_parts
        from .state import Owner

        home = secure_home(home) if home else burst_home()
        self.settings = settings if settings is not None else load_settings()
        self.parts = open_parts(home, caps=budget_caps(self.settings))  # also what its reconciliation passes use
        self.home, self.tag = home, self.parts.tag
        self.budget: Budget = self.parts.budget
        self.state: StateStore = self.parts.state
        self.connections: Connections = self.parts.connections
        self.owner: Owner = Owner.current()
        self.jobs: dict[str, Job] = {}
        self.machines: dict[str, KeptMachine] = {}  # kept across cells (%burst up), by name
        self._rotations: dict[tuple[str, ...], itertools.count[int]] = {}
        self._providers: dict[ProviderConfig, Provider] = {}
        self.offer_book = OfferBook(ttl=self.settings.offer_ttl_seconds, preference=self.settings.prefer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._watcher: asyncio.Task[None] | None = None  # the periodic reconciliation, on the loop
        self.clock: Clock = WALL_CLOCK  # what jobs' money runs on (tests inject one that jumps, as across a suspend)

    @classmethod
    def current(cls) -> Session:
        """The process-wide session, created on first use."""
        with cls._current_lock:
            if cls._current is None:
                cls._current = cls()
            return cls._current

    @classmethod
    def reset_current(cls) -> None:
        """Close and forget the process-wide session (tests, ``%reload_ext``)."""
        with cls._current_lock:
            session, cls._current = cls._current, None
        if session is not None:
            session.close()

    # -- the loop thread ------------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="burst-loop", daemon=True)
                self._thread.start()
            return self._loop

    def close(self) -> None:
        """Stop the loop thread and drop connections. Running jobs are not touched (see exit_hooks.py)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            providers, self._providers = list(self._providers.values()), {}
            watcher, self._watcher = self._watcher, None
        if loop is not None and not loop.is_closed() and loop.is_running():
            async def wind_down() -> None:
                if watcher is not None:
                    watcher.cancel()  # a task still pending when its loop closes is reported as destroyed
                await asyncio.gather(*(p.aclose() for p in providers), *([watcher] if watcher else []),
                                     return_exceptions=True)

            if providers or watcher is not None:
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(wind_down(), loop).result(5)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()
        self.connections.close_all()

    # -- jobs -----------------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec, *, namespace: Mapping[str, Any] | None = None) -> Job:
        """Validate ``spec`` (raising :class:`ConfigError` before anything is rented) and start the job: on the
        kept machine it is meant for (see :meth:`machine_for`), else on a machine of its own."""
        kept = self.machine_for(spec)
        if kept is not None:
            return self._submit_cell(kept, spec, namespace or {})
        job = self._job(self.plan(spec, namespace=namespace or {}))
        self._start(Lifecycle(job, self._parts()))
        return job

    def _parts(self) -> JobParts:
        return JobParts(install=self.parts, owner=self.owner, clock=self.clock)

    def _job(self, plan: JobPlan) -> Job:
        log = JobLogWriter(job_id=plan.job_id, home=self.home)
        job = Job(plan, self.loop, output_log=output_log_path(log.path.parent, plan.job_id))
        job.add_listener(log)  # `burst show` reads the job from any process
        self.jobs[job.id] = job
        return job

    def _start(self, lifecycle: Lifecycle | CellOnMachine) -> None:
        asyncio.run_coroutine_threadsafe(lifecycle.run(), self.loop)
        self.loop.call_soon_threadsafe(self._watch)

    # -- machines kept across cells (%burst up) -------------------------------------------------------------

    def up(self, spec: JobSpec, *, timeout: float | None = None) -> KeptMachine:
        """Rent a machine and start its persistent Python process (``spec.kept``); returns once it runs. Ctrl-C
        (or any error) while it comes up brings it down again."""
        from .kept import KeptMachine

        name = spec.name if "name" in spec.model_fields_set else self._machine_name()
        if name in {m.name for m in self.live_machines()}:
            raise ConfigError(f"machine {name} is up already: send cells to it, or %burst down {name} first")
        plan = self.plan(spec.model_copy(update={"name": name}), namespace={})
        job = self._job(plan)
        lifecycle = Lifecycle(job, self._parts())
        assert spec.idle_minutes is not None, "a kept machine's spec has its idle limit (%burst up, burst.up)"
        lifecycle.run_state.idle_seconds = spec.idle_minutes * 60.0
        kept = KeptMachine(name, job, lifecycle.run_state, lifecycle.remote)
        self.machines[name] = kept
        self._start(lifecycle)
        try:
            kept.wait_ready(timeout)
        except BaseException:
            kept.down()
            raise
        return kept

    def down(self, name: str | None = None, *, timeout: float | None = None) -> list[JobResult]:
        """Bring a kept machine down (every one with no ``name``): sync back, destroy, confirm gone, settle."""
        machines = self.live_machines()
        if name is not None:
            machines = [m for m in machines if m.name == name]
            if not machines:
                raise ConfigError(f"no machine named {name} is up ({self._up_names()})")
        return [m.down(timeout) for m in machines]

    def live_machines(self) -> list[KeptMachine]:
        return [m for m in list(self.machines.values()) if not m.job.done()]

    def machines_table(self) -> MachinesTable:
        from .kept import MachinesTable

        return MachinesTable(list(self.machines.values()))

    def _machine_name(self) -> str:
        n = 1
        while f"m{n}" in self.machines:
            n += 1
        return f"m{n}"

    def _up_names(self) -> str:
        names = [m.name for m in self.live_machines()]
        return f"up: {', '.join(names)}" if names else "none is up; start one with %burst up"

    def machine_for(self, spec: JobSpec) -> KeptMachine | None:
        """The kept machine a cell runs on: the one ``--on`` names, else the one that is up, for a cell that gives
        no placement option of its own (a cell that does rents its own machine, as without one)."""
        given = spec.model_fields_set & PLACEMENT
        if spec.on_machine is not None:
            kept = next((m for m in self.live_machines() if m.name == spec.on_machine), None)
            if kept is None:
                raise ConfigError(f"--on {spec.on_machine}: no machine of that name is up ({self._up_names()})")
            if given:
                raise ConfigError(f"--on {spec.on_machine} runs the cell on that machine: {FLAGS[min(given)]} is "
                                  "the machine's, given at %burst up")
            return kept
        live = self.live_machines()
        if spec.cell is None or given or not live:
            return None
        if len(live) > 1:
            raise ConfigError(f"machines {', '.join(m.name for m in live)} are up: say which with --on NAME (or "
                              "give the cell placement options such as --gpu to rent a machine of its own)")
        return live[0]

    def _submit_cell(self, kept: KeptMachine, spec: JobSpec, namespace: Mapping[str, Any]) -> Job:
        """A cell on ``kept``: checked like any cell (before anything is sent), then run in its Python process."""
        from .kept_cell import CellOnMachine

        theirs = sorted(spec.model_fields_set & _MACHINE_OWNS)
        if theirs:
            raise ConfigError(f"{FLAGS[theirs[0]]} is the machine's (give it at %burst up): this cell runs on "
                              f"machine {kept.name}")
        assert spec.cell is not None
        _parse_cell(spec.cell)  # a --pull may name what an earlier cell on the machine defined: not checked here
        mounts = plan_mounts(spec.mounts)
        kept.keep(mounts)
        pushed = pack_push(spec.push, namespace)
        update: dict[str, Any] = {"lease_seconds": kept.job.spec.lease_seconds}
        if "name" not in spec.model_fields_set:
            update["name"] = "cell"  # in views and the ledger, under its machine
        spec = spec.model_copy(update=update)
        # A cell's own maximum duration, within what is left of the machine's (its money is the machine's meter).
        machine_left = kept.run.plan.max_seconds - (self.clock.time() - (kept.run.first_launch or self.clock.time()))
        seconds = (spec.max_duration_minutes or HARD_MAX_MINUTES) * 60.0
        job_id = f"{_slug(spec.name)}-{secrets.token_hex(4)}"
        machine_plan = kept.run.plan
        plan = JobPlan(job_id=job_id, spec=spec, providers=machine_plan.providers, configs=machine_plan.configs,
                       cap_usd=kept.run.cap,
                       max_seconds=max(min(seconds, machine_left), 0.0),
                       mounts=mounts, pushed=pushed, cell=spec.cell, tag=self.tag,
                       handoff=Handoff(name=spec.name, tag=self.tag, max_results=spec.max_results_bytes),
                       on=OnMachine(kept.name, kept.jobdir))
        job = self._job(plan)
        kept.cells.append(job)
        self._start(CellOnMachine(job, self._parts(), kept))
        return job

    def live_jobs(self) -> list[Job]:
        return [j for j in list(self.jobs.values()) if not j.done()]  # a copy: the loop thread asks too

    def _watch(self) -> None:
        """On the loop: keep one periodic reconciliation going while this session has live jobs."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._reconcile_while_jobs_run())

    async def _reconcile_while_jobs_run(self) -> None:
        """Every ``reconcile_interval_seconds``, end what no live job owns (reconcile.py): never this session's
        live jobs, whose rows have a live owner. Ends with the last live job; the next submit starts it again."""
        from .reconcile import periodic_pass

        while self.live_jobs():
            await asyncio.sleep(self.settings.reconcile_interval_seconds)
            if self.live_jobs():
                await periodic_pass(self)

    def reconciler(self) -> Reconciler:
        """A reconciliation pass of this session: its parts, every provider with an account (built once, as for
        its jobs), and its jobs that have ended."""
        from .reconcile import Reconciler, providers_to_ask

        return Reconciler(self.parts, providers_to_ask(self.settings, self.provider, self.home),
                          finished={j.id for j in list(self.jobs.values()) if j.done()})

    def plan(self, spec: JobSpec, *, namespace: Mapping[str, Any], dry_run: bool = False) -> JobPlan:
        """Every check that needs no provider call: bad input fails here, with one clear line. A ``dry_run``
        plan writes nothing in the user's folders."""
        spec = self._with_defaults(spec)
        configs = {c.name: c for c in self._provider_configs(spec)}
        providers = {name: self.provider(cfg) for name, cfg in configs.items()}
        rented = [name for name, p in providers.items() if Capability.RENTED in p.capabilities]
        if spec.image is not None and len(providers) > 1:
            # `auto` with --image: only the marketplaces that run a container image of the user's choice.
            providers = {n: p for n, p in providers.items() if Capability.CUSTOM_IMAGE in p.capabilities}
            configs, rented = {n: configs[n] for n in providers}, [n for n in rented if n in providers]
            if not providers:
                raise ConfigError("--image is not supported by any configured marketplace")
        for name in rented:
            if spec.image is not None and Capability.CUSTOM_IMAGE not in providers[name].capabilities:
                raise ConfigError(f"--image is not supported by {name}: it runs its own images")
        if rented and spec.image is None and self.settings.image is not None:
            spec = spec.model_copy(update={"image": self.settings.image})
        if spec.image is not None and not rented:
            raise ConfigError(f"--image needs a marketplace provider; {', '.join(providers)} runs the machine's own "
                              f"Python")
        if spec.spot and not any(Capability.SPOT in providers[n].capabilities for n in rented):
            raise ConfigError(f"--spot needs a provider with interruptible capacity ({offering(Capability.SPOT)}); "
                              f"not {', '.join(providers)}")
        if spec.cell is not None:
            check_pulls(spec.pull, _parse_cell(spec.cell), spec.push)
        mounts = plan_mounts(spec.mounts, create=not dry_run)
        pushed = pack_push(spec.push, namespace)
        minutes = spec.max_duration_minutes or HARD_MAX_MINUTES
        cap: Decimal | None = spec.max_cost_usd
        if not rented:
            # The rate is declared (local, ssh): the cap is known now, and so is whether it buys enough.
            (config,) = configs.values()
            cap = decide_cap(cap, config.rate, minutes * 60.0, next(iter(providers.values())).teardown_seconds)
        job_id = f"{_slug(spec.name)}-{secrets.token_hex(4)}"
        handoff = Handoff(name=spec.name, tag=self.tag, mounts=[m.to_json() for m in mounts],
                          max_results=spec.max_results_bytes)
        sink = None
        if spec.result_sink:
            # Last: it may be a network call (S3 head_bucket), and every local check above is cheaper.
            sink = open_sink(spec.result_sink, job_id=job_id)
            sink.check()
            handoff.result_sink = sink.describe()
        timeout = spec.provision_timeout_seconds or self.settings.provision_timeout_seconds
        return JobPlan(job_id=job_id, spec=spec, providers=providers, configs=configs, cap_usd=cap,
                       max_seconds=minutes * 60.0, mounts=mounts, pushed=pushed, cell=spec.cell, tag=self.tag,
                       handoff=handoff, sink=sink, offers=self.offer_book if rented else None,
                       keys_dir=self.home / "keys", provision_timeout=timeout)

    def provider(self, config: ProviderConfig) -> Provider:
        """One provider object per configuration for the session's life (its HTTP client, its round-robin)."""
        with self._lock:
            provider = self._providers.get(config)
        if provider is None:
            provider = build_provider(config, connections=self.connections, home=self.home,
                                      rotations=self._rotations, settings=self.settings)
            with self._lock:
                provider = self._providers.setdefault(config, provider)
        return provider

    def marketplaces(self) -> dict[str, Provider]:
        """Every marketplace with an API key, built."""
        return {name: self.provider(ProviderConfig(name=name)) for name in accounts(self.settings)}

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the session loop and wait for it; Ctrl-C (or any error while waiting) cancels it."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def search_offers(self, query: OfferQuery, *, providers: list[str] | None = None,
                      refresh: bool = False) -> SearchResult:
        """Live offers across the configured marketplaces (or ``providers``), ranked, through the TTL cache."""
        if query.gpu_model is not None:
            canonical_gpu(query.gpu_model)  # a typo is one line about the name, not an error from each provider
        markets = self.marketplaces()
        for name in providers or ():
            if not is_marketplace(name):
                raise ConfigError(f"{name} has no offers to browse; choose from {offering(Capability.RENTED)}")
            require_account(name, self.settings)
        chosen = {n: p for n, p in markets.items() if not providers or n in providers}
        if not chosen:
            listed = [(d.account.key_var, f"[{d.name}]") for d in marketplaces() if d.account is not None]
            raise ConfigError(f"no marketplace is configured: set {_either(v for v, _ in listed)} (or api-key "
                              f"under {_either(t for _, t in listed)} in the user config)")
        return self.run_sync(self.offer_book.search(chosen, query, refresh=refresh))

    def dry_run(self, spec: JobSpec) -> DryRun | DryRunOnMachine:
        """What the job would rent and its worst case, renting nothing (or, for a cell a kept machine would run,
        which machine and what it has spent)."""
        kept = self.machine_for(spec)
        if kept is not None:
            return DryRunOnMachine(kept.name, kept.describe())
        plan = self.plan(spec, namespace={}, dry_run=True)
        offers, errors = self.run_sync(plan.search())
        if not offers:
            raise plan.no_offer(errors)
        best = offers[0]
        cap = plan.decide_cap(best, plan.providers[best.provider].teardown_seconds)
        return DryRun(offer=best, worst_case_usd=plan.worst_case(cap, offers), alternatives=offers[1:6],
                      errors=errors, max_minutes=plan.max_seconds / 60)

    def _with_defaults(self, spec: JobSpec) -> JobSpec:
        """Fill what the user did not set from [tool.burst] / the user config; canonicalise names."""
        settings, given = dict(self.settings), spec.model_fields_set
        update: dict[str, Any] = {}
        for option in JOB_OPTIONS:
            if option.field and option.setting and not option.late and option.field not in given:
                value = settings[option.setting]
                if value is not None:
                    update[option.field] = value
        if spec.offer is not None:
            update.update(_offer_defaults(spec))
        provider = str(update.get("provider", spec.provider))
        if provider not in PROVIDER_NAMES:
            import difflib

            close = difflib.get_close_matches(provider, PROVIDER_NAMES, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; choose from {', '.join(PROVIDER_NAMES)}"
            raise ConfigError(f"unknown provider {provider!r}{hint}")
        if "ssh_hosts" in given and spec.ssh_hosts and provider not in ("ssh", "auto"):
            raise ConfigError(f"--host is for provider ssh, not {provider}")
        if spec.gpu_model is not None:
            update["gpu_model"] = canonical_gpu(spec.gpu_model)
        return spec.model_copy(update=update) if update else spec

    def _provider_configs(self, spec: JobSpec) -> list[ProviderConfig]:
        """The candidates. ``auto``: your hosts if given; else, for a job that asks for a GPU, every configured
        marketplace; else this machine (a cell that needs no GPU is not worth renting one for)."""
        name = spec.provider
        if name == "auto":
            markets = list(accounts(self.settings))
            if spec.ssh_hosts:
                name = "ssh"
            elif markets and spec.gpu_model is not None:
                return [ProviderConfig(name=m) for m in markets]
            else:
                name = "local"
        elif is_marketplace(name):
            require_account(name, self.settings)
            return [ProviderConfig(name=name)]
        return [ProviderConfig(name=name, rate=spec.rate_usd_per_hour or Decimal(0), hosts=tuple(spec.ssh_hosts),
                               trust_on_first_use=spec.ssh_trust_on_first_use, python=spec.remote_python)]


def _either(names: Iterable[str]) -> str:
    """``a, b or c``."""
    *rest, last = names
    return f"{', '.join(rest)} or {last}" if rest else last


def _offer_defaults(spec: JobSpec) -> dict[str, Any]:
    """What ``--offer PROVIDER:ID`` decides alone: the provider (its prefix), the GPU count where it names one,
    and any GPU model (the live offer's is the one rented). An option that contradicts it is one clear error."""
    assert spec.offer is not None
    ref = OfferRef.parse(spec.offer)
    given = spec.model_fields_set
    if not is_marketplace(ref.provider):
        raise ConfigError(f"--offer {spec.offer}: {ref.provider} is not a marketplace; offers are from "
                          f"{offering(Capability.RENTED)}")
    if "provider" in given and spec.provider not in ("auto", ref.provider):
        raise ConfigError(f"--offer {spec.offer} is a {ref.provider} offer, not --provider {spec.provider}")
    update: dict[str, Any] = {"provider": ref.provider}
    if ref.gpus is not None:
        if "gpus" in given and spec.gpus != ref.gpus:
            raise ConfigError(f"--offer {spec.offer} is {ref.gpus} GPUs, not --gpus {spec.gpus}")
        update["gpus"] = ref.gpus
    if spec.gpu_model is None:
        update["gpu_model"] = ANY
    return update


@dataclass(frozen=True)
class DryRun:
    """``--dry-run``: the offer a job would take now, and the most it could cost."""

    offer: Offer
    worst_case_usd: Decimal
    alternatives: list[Offer]
    errors: dict[str, str]
    max_minutes: float

    def __repr__(self) -> str:
        o = self.offer
        price = format_rate(o.price_usd_per_hour) + "/h" + (" (spot)" if o.spot else "")
        why = "the cap" if self.worst_case_usd else "$0/h"
        lines = [f"would rent: {o.provider} {o.gpus} x {o.gpu_model or 'no GPU'} at {price}"
                 f"  [{o.provider}:{o.offer_id}] {o.description}".rstrip(),
                 f"worst case: {format_usd(self.worst_case_usd)} ({why}; at most {self.max_minutes:.0f} min)"]
        lines += [f"  next: {a.provider} {a.gpus} x {a.gpu_model} at {format_rate(a.price_usd_per_hour)}/h"
                  for a in self.alternatives]
        lines += [f"  {name}: {text}" for name, text in self.errors.items()]
        lines.append("nothing was rented (--dry-run)")
        return "\n".join(lines)


@dataclass(frozen=True)
class DryRunOnMachine:
    """``--dry-run`` of a cell that a kept machine would run: nothing would be rented."""

    name: str
    line: dict[str, str]  # as ``%burst machines`` shows it

    def __repr__(self) -> str:
        m = self.line
        return (f"would run on kept machine {self.name} ({m['where']}, {m['rate']}, {m['spent']} spent); nothing "
                "would be rented (--dry-run)")


def _parse_cell(cell: str) -> ast.Module:
    try:
        return ast.parse(cell)
    except SyntaxError as exc:
        raise ConfigError(f"the cell has a syntax error at line {exc.lineno}: {exc.msg}") from None
