"""The end of every job (:class:`Teardown`), always, whatever happened: a launched instance (or one a failed create
made anyway) is terminated, confirmed gone and settled on the ledger, and the job's result is decided."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from decimal import Decimal

from .agent import Reason
from .errors import (
    BudgetKilled,
    BurstError,
    ProviderError,
    RemoteSetupError,
    ResultsTooLarge,
    SyncError,
    VariableError,
    one_line,
)
from .events import EventType
from .job import JobResult, JobStatus
from .keys import remove_job_key
from .lifecycle_state import LifecycleState, StopRequested, utc
from .money import format_usd
from .providers.base import Capability, Instance, terminate_confirmed
from .stop_policy import STOP_TEXT
from .variables import PulledValues, unpack_pulled

__all__ = ["Teardown"]

_FINAL_EVENT = {
    JobStatus.COMPLETED: EventType.COMPLETED,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELLED: EventType.CANCELLED,
    JobStatus.BUDGET_KILLED: EventType.BUDGET_KILLED,
}


class Teardown(LifecycleState):
    """Terminate, confirm gone, decide the result, settle: the ``finally`` of the lifecycle."""

    async def _teardown(self, error: BaseException | None, reserved: bool) -> JobResult:
        job = self.job
        if isinstance(error, StopRequested):
            self.stop_reason, error = error.reason, None
        if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
            self.stop_reason, error = Reason.CANCELLED, None
        total: Decimal | None = None
        confirmed = terminated_here = False
        if self.instance is None and self.launched_at is not None and not job.handed_off.is_set():
            # The create call failed without an answer (a lost reply, a timeout after sending): the provider
            # may have made the instance anyway. Look for it by this install's tag and job id.
            self.instance = await self._find_lost_instance()
            if self.instance is None:
                await asyncio.to_thread(self.state.mark_abandoned, job.id)
                self.launched_at = None
        if self.instance is not None and not job.handed_off.is_set():
            terminated_here = True
            confirmed = await self._terminate()
            total = self.cost_so_far()
            job.emit(EventType.TERMINATED, instance_id=self.instance.instance_id,
                     total_cost_usd=total if confirmed else None,
                     error=None if confirmed else "terminate not confirmed; `%burst cleanup` will retry")
        elif self.spent > 0:
            total, confirmed = self.spent, True  # every attempt ended before the job did: still billed
        result = self._result(error, total if confirmed else None)
        if self.instance is None:
            # Nothing is rented now: what earlier attempts cost is on their own ledger rows already, and a reaper
            # knows nothing of this reservation, so release it here.
            if reserved:
                await asyncio.to_thread(self.budget.release, job.id)
        elif confirmed and (terminated_here or self.instance is None):
            # Settle even if the exit hooks handed the job off meanwhile: the reaper skips terminated rows.
            await self._settle(result)
        # Otherwise a reaper owns the instance, or the terminate is unconfirmed: the reservation stays counted
        # and the state row stays live until `%burst cleanup` (or the reaper) ends and settles it.
        if self.instance is not None and self.instance.endpoint is not None:
            await asyncio.to_thread(self._client().release)
        if confirmed and self.key is not None and self.plan.keys_dir is not None:
            await asyncio.to_thread(remove_job_key, self.plan.keys_dir, job.id)
        job.emit(_FINAL_EVENT[result.status], total_cost_usd=result.total_cost_usd,
                 max_cost_usd=self.cap or self.plan.cap_usd,
                 error=None if result.error is None else one_line(result.error))
        return result

    async def _find_lost_instance(self) -> Instance | None:
        """The instance a create that failed without an answer may have made (its create request was sent)."""
        assert self.launched_wall is not None
        provider = self.provider
        if provider is None or Capability.RENTED not in provider.capabilities:
            return None  # local and ssh create nothing before launch returns
        try:
            found = [i for i in await provider.list_owned(self.plan.tag) if i.job_id == self.job.id]
        except (ProviderError, OSError) as exc:
            self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: could not look for an instance the failed "
                          f"create may have made ({exc}); `%burst cleanup` will look again\n")
            return None
        if found:
            handoff = replace(self._billing_handoff(self.launched_wall), instance_id=found[0].instance_id)
            await asyncio.to_thread(self.state.record_launched, self.job.id, found[0].instance_id, handoff)
        return found[0] if found else None

    async def _terminate(self) -> bool:
        assert self.instance is not None
        problem = await terminate_confirmed(self.chosen, self.instance.instance_id, timeout=self.terminate_timeout)
        if problem is None:
            await asyncio.to_thread(self.state.mark_terminated, self.job.id)
            return True
        self.job.emit(EventType.OUTPUT, stream="stderr",
                      text=f"burst: could not confirm that {self.instance.instance_id} is gone: {problem}\n")
        return False

    def _lost_text(self) -> str:
        """What the job view and the ledger row say was never brought back (the instance was unreachable)."""
        return f"; not brought back: {self.lost}" if self.lost else ""

    def _result(self, error: BaseException | None, total: Decimal | None) -> JobResult:
        job = self.job
        result = JobResult(job_id=job.id, status=JobStatus.COMPLETED, total_cost_usd=total)
        if self.received is not None:
            result.files, result.notes = self.received.files, self.received.notes
            try:
                pulled = unpack_pulled(self.received.values_blob, job.spec.pull)
            except VariableError as exc:  # a values file the agent never writes: nothing of it is unpickled
                pulled = PulledValues()
                error = error or exc
            result.values = pulled.values
            if pulled.problems and error is None and self.remote_error is None and self.stop_reason is None \
                    and self.setup_error is None:  # a cell that never ran defined nothing: say why it did not
                error = VariableError("; ".join(pulled.problems))
        if self.shown is not None:
            result.result = self.shown
        recorded = (self.exit_record or {}).get("reason")
        # A cell that ended by itself before our stop reached it, with its results back, ended as it says.
        # (Not when results waited on this machine's disk until a stop: the stop ended the job, and says why.)
        ended_itself = recorded in (Reason.OK, Reason.ERROR) and self.received is not None and not self.lost
        reason = recorded if ended_itself else (self.stop_reason or recorded)
        rc = (self.exit_record or {}).get("rc")
        if error is None and self.received is not None and self.received.over_limit:
            error = ResultsTooLarge(f"results over the limit: not brought back: {self.received.over_limit}")
        if error is not None:
            result.status, result.error = JobStatus.FAILED, error
        elif reason == Reason.CANCELLED:
            result.status = JobStatus.CANCELLED
            if self.lost:  # cancelled while results waited for this machine's disk: the ledger says which
                result.error = SyncError("cancelled" + self._lost_text())
        elif reason == Reason.BUDGET:
            result.status = JobStatus.BUDGET_KILLED
            result.error = BudgetKilled(f"stopped at its cost cap ({format_usd(self.cap)})" + self._lost_text())
        elif self.setup_error is not None:
            result.status, result.error = JobStatus.FAILED, RemoteSetupError(self.setup_error)
        elif reason in (Reason.DEADLINE, Reason.LEASE):
            # Before remote_error: the stop reaches the cell as KeyboardInterrupt, an effect and not the cause.
            result.status, result.error = JobStatus.FAILED, BurstError(STOP_TEXT[str(reason)] + self._lost_text())
        elif self.remote_error is not None:
            result.status, result.error = JobStatus.FAILED, self.remote_error
        elif reason == Reason.AGENT_DIED:
            result.status, result.error = JobStatus.FAILED, BurstError(STOP_TEXT[str(reason)])
        elif rc not in (0, None):
            result.status, result.error = JobStatus.FAILED, BurstError(f"the command exited with status {rc}")
        elif self.exit_record is None and result.status is JobStatus.COMPLETED:
            result.status, result.error = JobStatus.FAILED, SyncError("the job ended without an exit status")
        return result

    async def _settle(self, result: JobResult) -> None:
        job = self.job
        assert self.launched_wall is not None
        if not (self.started or Capability.RENTED in self.chosen.capabilities):
            # The user's own machine, and the job never ran: nothing to bill, no ledger row.
            await asyncio.to_thread(self.budget.release, job.id)
            return
        await asyncio.to_thread(
            self.budget.settle, job.id, provider=self.chosen.name,
            instance_id=self.instance.instance_id if self.instance else "",
            gpu=(self.instance.gpu_model if self.instance else None) or (self.offer.gpu_model if self.offer else "")
            or "", rate_usd_per_hour=self.rate, started_at=self.launched_wall,
            ended_at=utc(self.clock.time()), attempt=self.attempt,
            # This attempt's row: earlier attempts have their own (the job's total is the sum).
            actual_usd=None if result.total_cost_usd is None else result.total_cost_usd - self.spent,
            status=result.status.value, name=job.spec.name,
            message=None if result.error is None else one_line(result.error))
