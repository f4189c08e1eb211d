"""burst-jupyter: run one notebook cell on a rented GPU, for a known and capped price.

    %load_ext burst_jupyter
    %%burst --max-cost 1 --mount ./out:out:rw --push lr --pull loss
    ...

The Python API is the same engine: ``burst.run(JobSpec(...))``, ``await burst.burst(JobSpec(...))``,
``burst.ledger()``, ``burst.set_daily_budget(usd=50)``. Names load on first use so ``%load_ext`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .extension import load_ipython_extension, unload_ipython_extension

if TYPE_CHECKING:
    from .api import (
        budget_bars,
        burst,
        cleanup,
        down,
        jobs,
        ledger,
        machines,
        offers,
        orphans,
        provider_status,
        run,
        set_daily_budget,
        set_weekly_budget,
        shutdown,
        submit,
        up,
    )
    from .errors import (
        BudgetExceededError,
        BudgetKilled,
        BurstError,
        ConfigError,
        ProviderError,
        RemoteError,
        SyncError,
        VariableError,
    )
    from .events import EventType, JobEvent
    from .job import Job, JobResult, JobStatus
    from .spec import JobSpec

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(
        ["budget_bars", "burst", "cleanup", "down", "jobs", "ledger", "machines", "offers", "orphans",
         "provider_status", "run", "set_daily_budget", "set_weekly_budget", "shutdown", "submit", "up"], "api"),
    **dict.fromkeys(
        ["BudgetExceededError", "BudgetKilled", "BurstError", "ConfigError", "ProviderError", "RemoteError",
         "SyncError", "VariableError"], "errors"),
    "EventType": "events",
    "JobEvent": "events",
    "Job": "job",
    "JobResult": "job",
    "JobStatus": "job",
    "JobSpec": "spec",
}

__all__ = [
    "BudgetExceededError", "BudgetKilled", "BurstError", "ConfigError", "EventType", "Job", "JobEvent",
    "JobResult", "JobSpec", "JobStatus", "ProviderError", "RemoteError", "SyncError", "VariableError", "budget_bars",
    "burst", "cleanup", "down", "jobs", "ledger", "load_ipython_extension", "machines", "offers", "orphans",
    "provider_status", "run", "set_daily_budget", "set_weekly_budget", "shutdown", "submit", "unload_ipython_extension",
    "up",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'burst_jupyter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
