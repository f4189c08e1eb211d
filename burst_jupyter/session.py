"""One Session per process: the library's own asyncio loop (in a daemon thread), the state store, the budget,
the connection pool, the providers, and every job this process started.

The kernel already runs an event loop, so the Session runs its own in a thread, as IPython's ``%%script``
does; blocking callers submit coroutines to it and wait in short slices so Ctrl-C still gets through.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import re
import secrets
import threading
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Settings, load_settings
from .errors import ConfigError
from .job import Job, JobPlan, Lifecycle, cost_of
from .paths import burst_home, db_path
from .providers import REGISTRY, ProviderConfig, build_provider
from .providers.catalog import canonical_gpu
from .sinks import open_sink
from .spec import HARD_MAX_MINUTES, JobSpec
from .sync import plan_mounts
from .variables import check_pulls, pack_push

if TYPE_CHECKING:
    from .budget import Budget
    from .connections import Connections
    from .state import Owner, StateStore

__all__ = ["PROVIDER_NAMES", "Session"]

#: The provider names a user can ask for. ``auto`` picks among the configured ones.
PROVIDER_NAMES = ("auto", *REGISTRY)

# What a job needs beyond its own run time to start and stop: the cap must buy at least this much.
_MIN_BILLABLE_SECONDS = 10.0


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:24] or "job"


def install_tag(home: Path) -> str:
    """This install's owner tag, put on everything it rents so reconciliation finds it at the provider."""
    path = home / "install-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        tag = f"burst-{secrets.token_hex(4)}"
        path.write_text(tag + "\n")
        return tag


class Session:
    _current: Session | None = None
    _current_lock = threading.Lock()

    def __init__(self, *, settings: Settings | None = None, home: Path | None = None) -> None:
        from .budget import Budget
        from .connections import Connections
        from .state import Owner, StateStore

        self.home = home or burst_home()
        self.settings = settings if settings is not None else load_settings()
        path = self.home / db_path().name if home else db_path()
        self.budget: Budget = Budget(path)
        self.state: StateStore = StateStore(path)
        self.connections: Connections = Connections()
        self.owner: Owner = Owner.current()
        self.tag = install_tag(self.home)
        self.jobs: dict[str, Job] = {}
        self._rotations: dict[tuple[str, ...], itertools.count[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._apply_initial_caps()

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

    def _apply_initial_caps(self) -> None:
        caps = self.budget.caps()
        if self.settings.daily_budget is not None and caps["day"] is None:
            self.budget.set_cap("day", self.settings.daily_budget)
        if self.settings.weekly_budget is not None and caps["week"] is None:
            self.budget.set_cap("week", self.settings.weekly_budget)

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
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()
        self.connections.close_all()

    # -- jobs -----------------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec, *, namespace: Mapping[str, Any] | None = None) -> Job:
        """Validate ``spec`` (raising :class:`ConfigError` before anything is rented) and start the job."""
        plan = self.plan(spec, namespace=namespace or {})
        job = Job(plan, self.loop)
        self.jobs[job.id] = job
        lifecycle = Lifecycle(job=job, budget=self.budget, state=self.state, connections=self.connections,
                              owner=self.owner)
        asyncio.run_coroutine_threadsafe(lifecycle.run(), self.loop)
        return job

    def live_jobs(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.done()]

    def plan(self, spec: JobSpec, *, namespace: Mapping[str, Any]) -> JobPlan:
        """Every check that needs no provider call: bad input fails here, with one clear line."""
        spec = self._with_defaults(spec)
        config = self._provider_config(spec)
        provider = build_provider(config, connections=self.connections, home=self.home, rotations=self._rotations)
        if spec.image is not None and provider.name in ("local", "ssh"):
            raise ConfigError(f"--image needs a marketplace provider; {provider.name} runs the machine's own Python")
        if spec.cell is not None:
            check_pulls(spec.pull, _parse_cell(spec.cell), spec.push)
        mounts = plan_mounts(spec.mounts)
        pushed = pack_push(spec.push, namespace)
        rate = config.rate
        minutes = spec.max_duration_minutes or HARD_MAX_MINUTES
        cap = spec.max_cost_usd if spec.max_cost_usd is not None else rate * minutes / 60
        if rate > 0 and cap < cost_of(rate, _MIN_BILLABLE_SECONDS + provider.teardown_seconds):
            raise ConfigError(f"--max-cost ${cap} buys only {float(cap / rate * 3600):.0f} s at ${rate}/h, "
                              f"too little to start and stop a job")
        job_id = f"{_slug(spec.name)}-{secrets.token_hex(4)}"
        handoff = {
            "name": spec.name,
            "tag": self.tag,
            "provider_config": config.to_json(),
            "mounts": [m.to_json() for m in mounts],
            "max_cost_usd": str(cap),
        }
        sink = None
        if spec.result_sink:
            # Last: it may be a network call (S3 head_bucket), and every local check above is cheaper.
            sink = open_sink(spec.result_sink, job_id=job_id)
            sink.check()
            handoff["result_sink"] = sink.describe()  # absolute and job-specific: the reaper reopens it as is
        return JobPlan(job_id=job_id, spec=spec, provider=provider, cap_usd=cap, max_seconds=minutes * 60.0,
                       mounts=mounts, pushed=pushed, cell=spec.cell, tag=self.tag, handoff=handoff, sink=sink)

    def _with_defaults(self, spec: JobSpec) -> JobSpec:
        """Fill what the user did not set from [tool.burst] / the user config; canonicalise names."""
        s, given = self.settings, spec.model_fields_set
        update: dict[str, Any] = {}
        defaults = {
            "provider": s.provider, "max_cost_usd": s.max_cost, "max_duration_minutes": s.max_duration_minutes,
            "rate_usd_per_hour": s.rate, "ssh_hosts": s.hosts, "ssh_trust_on_first_use": s.trust_new_hosts,
            "remote_python": s.remote_python, "lease_seconds": s.lease_seconds, "result_sink": s.result_sink,
        }
        for field, value in defaults.items():
            if field not in given and value is not None:
                update[field] = value
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

    @staticmethod
    def _provider_config(spec: JobSpec) -> ProviderConfig:
        name = spec.provider
        if name == "auto":
            name = "ssh" if spec.ssh_hosts else "local"  # marketplaces join `auto` once configured (issue 3)
        return ProviderConfig(name=name, rate=spec.rate_usd_per_hour or Decimal(0), hosts=tuple(spec.ssh_hosts),
                              trust_on_first_use=spec.ssh_trust_on_first_use, python=spec.remote_python)


def _parse_cell(cell: str) -> ast.Module:
    try:
        return ast.parse(cell)
    except SyntaxError as exc:
        raise ConfigError(f"the cell has a syntax error at line {exc.lineno}: {exc.msg}") from None
