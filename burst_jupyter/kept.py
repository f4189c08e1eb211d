"""A machine kept across cells (:class:`KeptMachine`, ``%burst up``): one rented machine running one persistent
Python process, to which ``%%burst`` cells are sent; what one cell defines, the next one sees.

The machine is a job of its own (its "cell" is the Python process, manifest ``machine``): the very lifecycle of a
one-off job rents it, reserves its ``--max-cost`` against the daily and weekly caps, uploads the mounts given at
``up`` once, renews its lease, holds its cap and its idle limit, and at ``%burst down`` (or its idle limit, its
cap, the kernel's exit) syncs back, terminates, confirms gone and settles it on its own ledger row. Each cell is a
job on it (kept_cell.py) with its own job directory there, whose share of the machine's bill the ledger shows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import BurstError
from .events import EventType
from .job import JobResult
from .machine import Machine
from .money import format_rate, format_usd

if TYPE_CHECKING:
    from .job import Job
    from .job_run import JobRun
    from .remote_run import RemoteRun
    from .sync import MountPlan, Signature

__all__ = ["KeptMachine", "MachinesTable"]


@dataclass
class KeptMachine:
    """A machine kept up across cells: ``job`` is its own job (the Python process on it); ``run`` its run state
    (the machine, its cap, its idle clock); ``remote`` follows it (and brings its rw mounts back after each cell)."""

    name: str
    job: Job
    run: JobRun
    remote: RemoteRun
    cells: list[Job] = field(default_factory=list)
    # Each kept mount's files as they last reached the machine (store key -> relative path -> signature).
    sent: dict[str, dict[str, Signature]] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    _followed: bool = field(default=False, init=False, repr=False)  # its view follows it (shown once)

    def __post_init__(self) -> None:
        self.job.add_listener(self._on_event)

    def __repr__(self) -> str:
        line = self.describe()
        idle = f" · {line['idle']}" if line["idle"] else ""
        return (f"kept machine {self.name} · {line['state']} · {line['where']} · {line['rate']} · {line['spent']}"
                f"{idle} · {line['cells']} cell(s) · job {self.job.id}")

    def _ipython_display_(self) -> None:
        """In a notebook: the machine's view, which follows it (its cells, its spend, its GPUs) until it is down."""
        if not self._followed:
            from IPython import get_ipython

            from .display import CellDisplay

            CellDisplay(self.job, get_ipython()).follow_in_background()
            self._followed = True
        self.job._ipython_display_()

    def _on_event(self, event: Any) -> None:
        if event.type is EventType.STARTED:
            self.ready.set()

    @property
    def up(self) -> bool:
        return self.ready.is_set() and not self.job.done()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until the machine's Python process runs (raising what ended the machine's job, if it ended first).
        Waits in short slices, so Ctrl-C gets through (the caller brings the machine down then)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.job.done():
                result = self.job.result()
                raise BurstError(f"machine {self.name} did not come up: "
                                 f"{result.error or result.status.value}")
            if deadline is not None and time.monotonic() > deadline:
                raise BurstError(f"machine {self.name} did not come up within {timeout:.0f} s")

    def down(self, timeout: float | None = None) -> JobResult:
        """Sync its rw mounts back, destroy it, confirm it gone and settle: its job's end."""
        for cell in list(self.cells):
            if not cell.done():
                cell.cancel()
        self.job.cancel()
        return self.job.wait(timeout)

    # -- what its cells run on ----------------------------------------------------------------------------

    @property
    def jobdir(self) -> str:
        return self.run.on.running.workdir

    def cell_machine(self, cell_id: str) -> Machine:
        """This machine as one cell sees it: the same instance, rate and billing clock; the cell's own job
        directory (under the machine's, so the machine's destroy takes it too)."""
        machine = self.run.on
        instance = dataclasses.replace(machine.running, workdir=f"{self.jobdir}/c/{cell_id}")
        view = Machine(provider=machine.provider, offer=machine.offer, parts=machine.parts, row=cell_id,
                       key=machine.key, instance=instance, launched_at=machine.launched_at)
        view.rate = machine.rate
        return view

    def keep(self, plans: list[MountPlan]) -> None:
        """A cell's own mounts, kept on the machine between cells: each in a store of its own there, sent only as
        far as it changed since it last reached the machine."""
        for plan in plans:
            key = f"{plan.local}\0{plan.mount.remote}\0{plan.mount.mode}".encode()
            plan.keep = hashlib.sha256(key).hexdigest()[:16]
            plan.sent = self.sent.get(plan.keep)

    def remember(self, plans: list[MountPlan]) -> None:
        """What a cell's mounts left on the machine (as uploaded, and as synced back), for the next cell."""
        for plan in plans:
            if plan.keep is not None and plan.uploaded is not None:
                self.sent[plan.keep] = dict(plan.uploaded)

    def spent(self) -> Decimal:
        return self.run.cost_so_far()

    def idle_left(self) -> float | None:
        """Seconds until its idle limit brings it down (None: a cell is running, or it is not up yet)."""
        until = self.run.idle_until()
        return None if until is None else max(until - self.run.clock.time(), 0.0)

    def describe(self) -> dict[str, str]:
        """One line of ``%burst machines``."""
        machine = self.run.machine
        idle = self.idle_left()
        state = ("down" if self.job.done() else "busy" if self.run.cells_running else "up" if self.ready.is_set()
                 else "starting")
        return {
            "name": self.name, "state": state,
            "where": "" if machine is None else f"{machine.name} {machine.offer.gpu_model or 'no GPU'}",
            "rate": "" if machine is None else f"{format_rate(machine.rate)}/h",
            "spent": f"{format_usd(self.spent())} of {format_usd(self.run.cap)}",
            "idle": "" if idle is None or self.job.done() else f"down in {idle / 60:.1f} min",
            "cells": str(len(self.cells)),
            "job": self.job.id,
        }


class MachinesTable:
    """``%burst machines``: the kept machines of this kernel, as text and HTML."""

    COLUMNS = ("name", "state", "where", "rate", "spent", "idle", "cells", "job")

    def __init__(self, machines: list[KeptMachine]) -> None:
        self.lines = [m.describe() for m in machines]

    def __repr__(self) -> str:
        from .widgets.render import aligned_rows

        if not self.lines:
            return "no kept machine (start one with %burst up)"
        return "\n".join(aligned_rows([self.COLUMNS, *([line[c] for c in self.COLUMNS] for line in self.lines)]))

    def _repr_html_(self) -> str:
        import html

        from .widgets.render import no_math

        if not self.lines:
            return no_math(f"<p>{html.escape(repr(self))}</p>")
        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(line[c])}</td>" for c in self.COLUMNS) + "</tr>"
                       for line in self.lines)
        return no_math(f'<table class="burst-machines"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
