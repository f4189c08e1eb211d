"""A job's lifecycle (:class:`Lifecycle`): one state machine on the session loop.

select offer -> reserve budget -> record intent -> launch -> record instance -> connect -> upload and start the
agent -> stream (lease, cost cap, deadline, cancel, reconnect, preemption, periodic pulls) -> results ->
terminate -> confirm gone -> settle. Each step emits a :class:`JobEvent`. The ``finally`` of the lifecycle is the
first of the four layers against a leaked instance: whatever happened, a launched instance is terminated,
confirmed gone and settled. A preempted instance is ended and billed as an attempt of its own, and with
``--retries`` the job relaunches on the next offer.

:class:`Lifecycle` holds only that order. The job's run (job_run.py) holds its money and its current
:class:`~burst_jupyter.machine.Machine` and :class:`~burst_jupyter.attempt.Attempt`; the phases are parts of
their own over it: provisioning.py (rent, boot, relaunch), remote_run.py (the run on the machine, to its
results) and teardown.py (always), with the pure decisions in stop_policy.py (when to stop), attempt.py (what a
record means) and outcome.py (how the job ended).
"""

from __future__ import annotations

import asyncio

from .errors import Preempted
from .events import EventType
from .job import Job, JobResult
from .job_run import JobRun
from .machine import JobParts
from .provisioning import Provisioning
from .remote_run import RemoteRun
from .teardown import Teardown

__all__ = ["Lifecycle"]


class Lifecycle:
    """Runs one job on the machines it rents. Injected (``parts``): the budget, the state store, the connection
    pool, who owns it, the clock."""

    def __init__(self, job: Job, parts: JobParts) -> None:
        self.run_state = JobRun(job=job, parts=parts)
        self.provisioning = Provisioning(self.run_state)
        self.remote = RemoteRun(self.run_state)
        self.teardown = Teardown(self.run_state)

    async def run(self) -> JobResult:
        run = self.run_state
        job, plan = run.job, run.plan
        error: BaseException | None = None
        reserved = False
        try:
            job.emit(EventType.QUEUED, max_cost_usd=plan.cap_usd, provider=", ".join(plan.providers))
            offers = await self.provisioning.select_offer()
            reservation = await asyncio.to_thread(
                run.parts.budget.reserve, job_id=job.id, name=plan.spec.name, provider=run.chosen.name,
                gpu=offers[0].gpu_model or "", amount=plan.worst_case(run.cap, offers))
            reserved = True
            job.emit(EventType.BUDGET_RESERVED, max_cost_usd=run.cap)
            for warning in reservation.warnings:
                job.emit(EventType.BUDGET_WARNING, message=warning)
            run.retries_left = plan.spec.retries
            while True:
                run.check_cancel()
                await self.provisioning.launch(offers)
                try:
                    await self.remote.start()
                    break
                except Preempted as exc:
                    offers = await self.provisioning.after_preemption(exc)
        except BaseException as exc:
            error = exc
        finally:
            result = await self.teardown(error, reserved)
        job._finish(result)
        return result
