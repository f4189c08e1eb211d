"""A job's lifecycle (:class:`Lifecycle`): one state machine on the session loop.

select offer -> reserve budget -> record intent -> launch -> record instance -> connect -> upload and start the
agent -> stream (lease, cost cap, deadline, cancel, reconnect, preemption, periodic pulls) -> results ->
terminate -> confirm gone -> settle. Each step emits a :class:`JobEvent`. The ``finally`` of the lifecycle is the
first of the four layers against a leaked instance: whatever happened, a launched instance is terminated,
confirmed gone and settled. A preempted instance is ended and billed as an attempt of its own, and with
``--retries`` the job relaunches on the next offer.

:class:`Lifecycle` holds only that order; its phases are the classes it inherits, each in a module of its own:
provisioning.py (rent, boot, relaunch), remote_run.py (the run on the instance, to its results) and teardown.py
(always), over stop_policy.py (when a job stops) and lifecycle_state.py (what they all share).
"""

from __future__ import annotations

import asyncio

from .errors import Preempted
from .events import EventType
from .job import JobResult
from .provisioning import Provisioning
from .remote_run import RemoteRun
from .teardown import Teardown

__all__ = ["Lifecycle"]


class Lifecycle(Provisioning, RemoteRun, Teardown):
    """Runs one job. Injected: the budget, the state store, the connection pool, who owns it."""

    async def run(self) -> JobResult:
        job, plan = self.job, self.plan
        error: BaseException | None = None
        reserved = False
        try:
            job.emit(EventType.QUEUED, max_cost_usd=plan.cap_usd, provider=", ".join(plan.providers))
            offers = await self._select_offer()
            reservation = await asyncio.to_thread(
                self.budget.reserve, job_id=job.id, name=plan.spec.name, provider=self.chosen.name,
                gpu=offers[0].gpu_model or "", amount=plan.worst_case(self.cap, offers))
            reserved = True
            job.emit(EventType.BUDGET_RESERVED, max_cost_usd=self.cap)
            for warning in reservation.warnings:
                job.emit(EventType.BUDGET_WARNING, message=warning)
            self.retries_left = plan.spec.retries
            while True:
                self._check_cancel()
                await self._launch(offers)
                try:
                    await self._run_remote()
                    break
                except Preempted as exc:
                    offers = await self._after_preemption(exc)
        except BaseException as exc:
            error = exc
        finally:
            result = await self._teardown(error, reserved)
        job._finish(result)
        return result
