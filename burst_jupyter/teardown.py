"""The end of every job (:class:`Teardown`), always, whatever happened: a launched machine (or one a failed create
made anyway) is terminated, confirmed gone and settled on the ledger, and the job's result is decided
(outcome.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from decimal import Decimal

from .agent import Reason
from .errors import ProviderError, one_line
from .events import EventType
from .job import JobResult, JobStatus
from .job_run import JobRun, StopRequested
from .keys import remove_job_key
from .outcome import decide_result
from .providers.base import Instance

__all__ = ["FINAL_EVENT", "Teardown"]

FINAL_EVENT = {
    JobStatus.COMPLETED: EventType.COMPLETED,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELLED: EventType.CANCELLED,
    JobStatus.BUDGET_KILLED: EventType.BUDGET_KILLED,
}


class Teardown:
    """Terminate, confirm gone, decide the result, settle: the ``finally`` of the lifecycle."""

    def __init__(self, run: JobRun) -> None:
        self.run = run

    async def __call__(self, error: BaseException | None, reserved: bool) -> JobResult:
        run, job, machine = self.run, self.run.job, self.run.machine
        budget = run.parts.budget
        if isinstance(error, StopRequested):
            run.attempt.stop_reason, error = error.reason, None
        if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
            run.attempt.stop_reason, error = Reason.CANCELLED, None
        total: Decimal | None = None
        confirmed = terminated_here = False
        # The create call failed without an answer (a lost reply, a timeout after sending): the provider may have
        # made the instance anyway. Look for it by this install's tag and job id.
        if machine is not None and machine.instance is None and machine.launched_at is not None \
                and not job.handed_off.is_set() and await self._find_lost_instance() is None:
            await asyncio.to_thread(run.parts.state.mark_abandoned, job.id)
            machine.launched_at = None
        rented = machine is not None and machine.instance is not None
        if machine is not None and machine.instance is not None and not job.handed_off.is_set():
            terminated_here = True
            confirmed = await self._terminate()
            total = run.cost_so_far()
            job.emit(EventType.TERMINATED, instance_id=machine.instance.instance_id,
                     total_cost_usd=total if confirmed else None,
                     error=None if confirmed else "terminate not confirmed; `%burst cleanup` will retry")
        elif run.spent > 0:
            total, confirmed = run.spent, True  # every attempt ended before the job did: still billed
        result = decide_result(job.id, run.attempt, error, total if confirmed else None, pull=job.spec.pull,
                               cap=run.cap, lost=run.lost, kept=job.spec.kept)
        if not rented:
            # Nothing is rented now: what earlier attempts cost is on their own ledger rows already, and a reaper
            # knows nothing of this reservation, so release it here.
            if reserved:
                await asyncio.to_thread(budget.release, job.id)
        elif confirmed and terminated_here:
            # Settle even if the exit hooks handed the job off meanwhile: the reaper skips terminated rows.
            await self._settle(result)
        # Otherwise a reaper owns the instance, or the terminate is unconfirmed: the reservation stays counted
        # and the state row stays live until `%burst cleanup` (or the reaper) ends and settles it.
        if machine is not None:
            await machine.release()
        if confirmed and run.key is not None and run.plan.keys_dir is not None:
            await asyncio.to_thread(remove_job_key, run.plan.keys_dir, job.id)
        job.emit(FINAL_EVENT[result.status], total_cost_usd=result.total_cost_usd,
                 max_cost_usd=run.cap or run.plan.cap_usd,
                 error=None if result.error is None else one_line(result.error))
        return result

    async def _find_lost_instance(self) -> Instance | None:
        """The instance a create that failed without an answer may have made (its create request was sent)."""
        run, machine = self.run, self.run.on
        since = machine.launched_at
        assert since is not None
        try:
            found = await machine.find_lost(run.plan.tag)
        except (ProviderError, OSError) as exc:
            run.note(f"could not look for an instance the failed create may have made ({exc}); `%burst cleanup` "
                     "will look again")
            return None
        if found is not None:
            await asyncio.to_thread(run.parts.state.record_launched, run.job.id, found.instance_id,
                                    replace(run.billing_handoff(since), instance_id=found.instance_id))
        return found

    async def _terminate(self) -> bool:
        run, machine = self.run, self.run.on
        problem = await machine.terminate()
        if problem is None:
            return True
        run.note(f"could not confirm that {machine.running.instance_id} is gone: {problem}")
        return False

    async def _settle(self, result: JobResult) -> None:
        run, machine = self.run, self.run.on
        if not (run.attempt.started or machine.rented):
            # The user's own machine, and the job never ran: nothing to bill, no ledger row.
            await asyncio.to_thread(run.parts.budget.release, run.job.id)
            return
        await machine.settle(
            attempt=run.attempt.number,
            # This attempt's row: earlier attempts have their own (the job's total is the sum).
            actual=None if result.total_cost_usd is None else result.total_cost_usd - run.spent,
            status=result.status.value, name=run.job.spec.name,
            message=None if result.error is None else one_line(result.error))
