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

from .session import Session
from .spec import JobSpec, parse_money

if TYPE_CHECKING:
    from .budget import LedgerTable
    from .job import Job, JobResult
    from .reaper import Outcome
    from .widgets import BudgetBars

__all__ = [
    "budget_bars",
    "burst",
    "cleanup",
    "jobs",
    "ledger",
    "orphans",
    "run",
    "set_daily_budget",
    "set_weekly_budget",
    "shutdown",
    "submit",
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


def cleanup(*, dry_run: bool = False) -> list[Outcome] | list[str]:
    """End what kernels that are gone left behind: sync back, terminate, settle. ``dry_run`` only lists."""
    from .reaper import reap

    session = Session.current()
    leftovers = session.state.orphans()
    if dry_run:
        return [o.job_id for o in leftovers]
    return reap(leftovers, state=session.state, budget=session.budget, connections=session.connections,
                home=session.home, reason="burst cleanup")
