"""A cell on a kept machine (:class:`CellOnMachine`): the run of a one-off job (remote_run.py: upload, stream,
lease, stops, results) with neither a rental before it nor a terminate after it.

Its job directory lives under the machine's; its manifest names the machine's job directory, where the agent
hands the cell to the machine's Python process, so names persist from cell to cell. Its money is the machine's
(the same rate since the same create request, against the machine's cap): a cell that would go past the cap is
stopped, and the machine ends with it. Ctrl-C interrupts the cell (KeyboardInterrupt there) and keeps the
machine. At its end the cell's job directory is removed, the machine's own rw mounts come back (only what changed),
and the cell is recorded with its share of the machine's bill.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

from .agent import Reason
from .budget.cells import CellRow
from .errors import BurstError, ProviderError, one_line
from .events import EventType
from .job import Job, JobResult, cost_of
from .job_run import JobRun, StopRequested
from .kept import KeptMachine
from .machine import JobParts
from .meter import utc
from .money import format_usd
from .outcome import decide_result
from .remote_run import RemoteRun
from .teardown import FINAL_EVENT

__all__ = ["CellOnMachine"]


class CellOnMachine:
    """Runs one cell on a kept machine, from its upload to its recorded share."""

    def __init__(self, job: Job, parts: JobParts, kept: KeptMachine) -> None:
        self.kept = kept
        self.run_state = JobRun(job=job, parts=parts)
        self.remote = RemoteRun(self.run_state)

    async def run(self) -> JobResult:
        run, job, kept = self.run_state, self.run_state.job, self.kept
        error: BaseException | None = None
        started: float | None = None
        try:
            job.emit(EventType.QUEUED, max_cost_usd=kept.run.cap, provider=f"machine {kept.name}")
            if not kept.up:
                raise BurstError(f"machine {kept.name} is down; start one with %burst up")
            run.machine = kept.cell_machine(job.id)
            run.cap, run.spent, run.key = kept.run.cap, kept.run.spent, kept.run.key
            kept.run.cell_started()
            started = run.first_launch = run.clock.time()  # the cell's own maximum duration counts from here
            await self.remote.start()
        except BaseException as exc:
            error = exc
        finally:
            result = await self._end(error, started)
        job._finish(result)
        return result

    async def _end(self, error: BaseException | None, started: float | None) -> JobResult:
        """Remove the cell's folder there (never the machine), bring the machine's rw mounts back, record the cell's
        share, decide and say how it ended."""
        run, job, kept = self.run_state, self.run_state.job, self.kept
        if isinstance(error, StopRequested):
            run.attempt.stop_reason, error = error.reason, None
        if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
            run.attempt.stop_reason, error = Reason.CANCELLED, None
        machine_stop = kept.run.attempt.stop_reason or kept.run.limits().out_of_time_or_money(cancelled=False)
        if machine_stop in (Reason.BUDGET, Reason.DEADLINE) and run.attempt.stop_reason in (None, machine_stop):
            run.attempt.machine_stopped(machine_stop)
        ended = run.clock.time()
        share = Decimal(0) if started is None else cost_of(kept.run.on.rate, ended - started)
        if started is not None:
            kept.run.cell_ended()
            machine = run.on
            try:
                await asyncio.to_thread(machine.client().destroy)
            except (BurstError, ProviderError, OSError, EOFError) as exc:
                run.note(f"could not remove this cell's folder on machine {kept.name}: {one_line(exc)}")
            await machine.release()
            kept.remember(run.plan.mounts)
            # A cell stopped at the cap or the maximum duration leaves the machine to its own limits, which say the
            # same on the same meter: it ends as what it is (budget killed), not as brought down.
            if run.attempt.stop_reason not in (Reason.BUDGET, Reason.DEADLINE) and not kept.job.done() \
                    and any(m.rw for m in kept.run.plan.mounts):
                await kept.remote.pull()  # the machine's own rw mounts: what this cell changed in them
        result = decide_result(job.id, run.attempt, error, share, pull=job.spec.pull, cap=run.cap, lost=run.lost)
        if started is not None:
            await asyncio.to_thread(run.parts.budget.record_cell, CellRow(
                machine_job_id=kept.job.id, cell_job_id=job.id, name=job.spec.name, started_at=utc(started),
                ended_at=utc(ended), output_bytes=job.output_bytes, share_usd=share, status=result.status.value))
            kept.run.note(f"cell {job.id} {result.status.value} in {ended - started:.1f} s, its share "
                          f"{format_usd(share)}; the machine has spent {format_usd(kept.spent())} of "
                          f"{format_usd(kept.run.cap)}; {kept.run.idle_text()}")
        job.emit(FINAL_EVENT[result.status], total_cost_usd=result.total_cost_usd, max_cost_usd=run.cap,
                 error=None if result.error is None else one_line(result.error))
        return result
