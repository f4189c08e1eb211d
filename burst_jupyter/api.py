"""The Python API, the same engine as the magics: ``burst.run(JobSpec(...))``, ``await burst.burst(...)``,
``burst.ledger()``, budgets, shutdown and cleanup.

Example:
    >>> import burst_jupyter as burst                                  # doctest: +SKIP
    >>> result = burst.run(burst.JobSpec(cell="x = 6 * 7", pull=["x"]))  # doctest: +SKIP
    >>> result.values["x"]                                             # doctest: +SKIP
    42
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .session import Session
from .spec import JobSpec, gpus_problem, parse_money

if TYPE_CHECKING:
    from .budget import LedgerTable
    from .job import Job, JobResult
    from .kept import KeptMachine, MachinesTable
    from .offer_book import ProvidersStatus
    from .reconcile_report import Report
    from .widgets import BudgetBars
    from .widgets.offer_browser import OfferBrowser

__all__ = [
    "budget_bars",
    "burst",
    "cleanup",
    "down",
    "jobs",
    "ledger",
    "machines",
    "offers",
    "orphans",
    "provider_status",
    "run",
    "set_daily_budget",
    "set_weekly_budget",
    "shutdown",
    "submit",
    "up",
]


def _caller_namespace(depth: int) -> Mapping[str, Any]:
    return sys._getframe(depth + 1).f_globals


def submit(spec: JobSpec, *, namespace: Mapping[str, Any] | None = None) -> Job:
    """Start a job and return its handle at once. ``--push`` names are read from ``namespace`` (default: the
    caller's globals). Raises ConfigError/VariableError before anything is rented."""
    return Session.current().submit(spec, namespace=namespace if namespace is not None else _caller_namespace(1))


def run(spec: JobSpec, *, namespace: Mapping[str, Any] | None = None) -> JobResult:
    """Run a job to the end, streaming its output (in a notebook: with the job view). Raises the job's error
    (RemoteError for an exception in the cell, BudgetExceededError, ...); Ctrl-C cancels it cleanly."""
    from .display import CellDisplay

    job = Session.current().submit(spec, namespace=namespace if namespace is not None else _caller_namespace(1))
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    display = CellDisplay(job, shell)
    display.show()
    result = display.run_blocking()
    if result.error is not None:
        raise result.error
    return result


async def burst(spec: JobSpec, *, namespace: Mapping[str, Any] | None = None) -> Job:
    """``job = await burst(JobSpec(...))``: start a job from async code; then ``async for e in
    job.stream_events()`` and ``await job``."""
    return Session.current().submit(spec, namespace=namespace if namespace is not None else _caller_namespace(1))


def up(*, idle: float | None = None, name: str | None = None, timeout: float | None = None,
       **options: Any) -> KeptMachine:
    """Rent a machine and keep it across cells (``%burst up``): one persistent Python process, to which every
    ``%%burst`` cell without placement options of its own is sent, so what one cell defines the next one sees.
    ``options`` are JobSpec fields (``gpu_model="RTX_4090", max_cost_usd=5, mount_local=[...]``); ``idle`` is
    the minutes without a cell after which it is brought down (default 15), by this kernel or, with this kernel
    gone, by its agent. Returns once its Python process runs; ``burst.down()`` brings it down."""
    from .options import FLAGS, IDLE_MINUTES

    fields = dict(options, idle_minutes=IDLE_MINUTES if idle is None else idle)
    if name is not None:
        fields["name"] = name
    return Session.current().up(JobSpec.build(FLAGS, **fields), timeout=timeout)


def down(name: str | None = None, *, timeout: float | None = None) -> list[JobResult]:
    """Bring a kept machine down (all of them without ``name``): its rw mounts synced back, destroyed, confirmed
    gone, settled on the ledger with each cell's share."""
    return Session.current().down(name, timeout=timeout)


def machines() -> MachinesTable:
    """The kept machines of this kernel: where, $/h, spent of cap, idle countdown, cells run."""
    return Session.current().machines_table()


def ledger() -> LedgerTable:
    """Every settled job: provider, instance, GPU, $/h, start, end, reserved and actual cost, status."""
    return Session.current().budget.table()


def budget_bars() -> BudgetBars:
    """Today's and this week's spend against the caps."""
    from .widgets import BudgetBars

    return BudgetBars(Session.current().budget.snapshot())


def set_daily_budget(usd: Decimal | float | int | str | None) -> None:
    """Cap what all jobs may spend per day (local time), persisted for every kernel. None removes the cap."""
    amount = None if usd is None else parse_money(usd, what="daily budget")
    Session.current().budget.set_cap("day", amount)


def set_weekly_budget(usd: Decimal | float | int | str | None) -> None:
    """Cap what all jobs may spend per week (Monday to Sunday), persisted. None removes the cap."""
    amount = None if usd is None else parse_money(usd, what="weekly budget")
    Session.current().budget.set_cap("week", amount)


def jobs() -> list[Job]:
    """The jobs this process started, oldest first."""
    return list(Session.current().jobs.values())


def shutdown() -> list[str]:
    """Hand every job of this process to a detached reaper (sync back, terminate, settle). Returns their ids."""
    from .exit_hooks import hand_off

    return hand_off(Session.current(), "burst.shutdown()")


def orphans() -> list[str]:
    """Jobs recorded by kernels that are gone and still holding an instance."""
    return [o.job_id for o in Session.current().state.orphans()]


def cleanup(*, dry_run: bool = False) -> Report:
    """End what no live job owns: jobs of kernels that are gone (synced back, terminated, settled) and instances
    every configured marketplace lists with this install's tag that no live job knows (terminated, billed as
    "leaked" in the ledger). Returns the report, a table: provider, instance, job, $/h, up for, cost, result.
    ``dry_run`` lists what would be ended, with its cost so far, and ends nothing.

    What the reconciliation at load (or while jobs ran) did and nobody has seen yet is printed first.
    """
    from .reconcile import run_in_session

    return run_in_session(Session.current(), dry_run=dry_run)


def offers(gpu: str | None = None, *, gpus: int = 1, max_price: Decimal | float | str | None = None,
           provider: str | None = None, min_reliability: float | None = None, spot: bool = False,
           prototyping: bool = False, cell: str | None = None, max_cost: Decimal | float | str | None = None,
           refresh: bool = False) -> OfferBrowser:
    """Browse live offers across the configured marketplaces: filters, a sortable table, refresh.
    ``refresh`` asks every provider again instead of reusing offers from the last 30 s; ``prototyping`` also shows
    development capacity (Thunder's prototyping mode), as ``--prototyping`` allows a job to rent it.

    The browser shows a ready ``%%burst`` cell for the chosen offer, copied in one click; ``.insert()`` on the
    browser, run in a cell, adds it below that cell. With ``cell`` (Python source) a Launch button runs it on the
    chosen offer at once, in the background, capped at ``max_cost``, and shows its view.

    Example:
        >>> burst.offers(gpu="RTX_4090", max_price=1.0)   # doctest: +SKIP
    """
    from .providers.catalog import CATALOG, canonical_gpu
    from .widgets.offer_browser import OfferBrowser
    from .widgets.offer_table import OfferFilter

    problem = gpus_problem(gpus)
    if problem is not None:
        raise ConfigError(f"--gpus {problem}")
    session = Session.current()
    namespace = _caller_namespace(1)
    initial = OfferFilter(gpu=canonical_gpu(gpu) if gpu else None, gpus=gpus,
                          max_price=None if max_price is None else parse_money(max_price, what="max_price"),
                          provider=provider, min_reliability=min_reliability, spot=spot, prototyping=prototyping)
    configured = list(session.marketplaces())

    def search(f: OfferFilter, again: bool) -> Any:
        return session.search_offers(f.to_query(), providers=[f.provider] if f.provider else None, refresh=again)

    first = search(initial, refresh)

    def launch(offer: Any) -> Job:
        from IPython import get_ipython

        from .display import CellDisplay

        assert cell is not None
        spec = JobSpec.build(cell=cell, provider=offer.provider, offer=offer.ref,
                             gpu_model=offer.gpu_model, gpus=offer.gpus, spot=offer.spot,
                             prototyping=offer.prototyping, name="from-offers",
                             **({} if max_cost is None else {"max_cost_usd": parse_money(max_cost)}))
        job = session.submit(spec, namespace=namespace)
        view = CellDisplay(job, get_ipython())
        view.show()
        view.follow_in_background()
        return job

    def insert(text: str) -> None:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None:
            raise ConfigError("insert() adds a cell in a notebook or IPython; elsewhere use cell_text()")
        shell.set_next_input(text, replace=False)  # in the execute reply of the cell running this

    return OfferBrowser(search=search, initial=initial, providers=configured, result=first,
                        on_launch=launch if cell is not None else None, on_insert=insert,
                        gpu_choices=tuple(CATALOG))


def provider_status() -> ProvidersStatus:
    """Each marketplace: configured or not, reachable, and its lowest price for common GPUs right now."""
    from .offer_book import ProvidersStatus
    from .providers import marketplaces
    from .providers.base import OfferQuery
    from .providers.catalog import ANY

    session = Session.current()
    configured = list(session.marketplaces())
    missing = {d.name: f"set {d.account.key_var}" for d in marketplaces() if d.account and d.name not in configured}
    if not configured:
        from .offer_book import SearchResult

        return ProvidersStatus.from_search(SearchResult(offers=[]), configured=[], missing=missing)
    result = session.search_offers(OfferQuery(gpu_model=ANY, gpus=1), refresh=True)  # reachable now, not 30 s ago
    return ProvidersStatus.from_search(result, configured=configured, missing=missing)
