"""How a job ended (:func:`decide_result`), as pure code: the last attempt, the error that ended the run (if any),
what was never brought back and the bill in, its :class:`~burst_jupyter.job.JobResult` out.

Example:
    >>> from decimal import Decimal
    >>> attempt = Attempt(exit_record={"k": "exit", "reason": "ok", "rc": 0})
    >>> decide_result("j", attempt, None, Decimal("0.5"), pull=[], cap=Decimal(1), lost=None).status.value
    'completed'
    >>> attempt.stop_reason = "budget"   # our stop ended the cell before it ended by itself
    >>> attempt.exit_record = {"k": "exit", "reason": "budget", "rc": None}
    >>> decide_result("j", attempt, None, Decimal(1), pull=[], cap=Decimal(1), lost=None).status.value
    'budget_killed'
"""

from __future__ import annotations

from decimal import Decimal

from .agent import Reason
from .attempt import Attempt
from .errors import BudgetKilled, BurstError, RemoteSetupError, ResultsTooLarge, SyncError, VariableError
from .job import JobResult, JobStatus
from .money import format_usd
from .stop_policy import STOP_TEXT
from .variables import PulledValues, unpack_pulled

__all__ = ["decide_result"]


def decide_result(job_id: str, attempt: Attempt, error: BaseException | None, total: Decimal | None, *,
                  pull: list[str], cap: Decimal, lost: str | None, kept: bool = False) -> JobResult:
    """The job's result from its last ``attempt``: ``error`` ended the run (None: it ran to its end or was stopped,
    ``attempt.stop_reason`` says why), ``total`` is the confirmed bill (None: not known yet), ``lost`` is what
    never came back when the job had to end with its instance unreachable."""
    lost_text = f"; not brought back: {lost}" if lost else ""
    result = JobResult(job_id=job_id, status=JobStatus.COMPLETED, total_cost_usd=total)
    received = attempt.received
    if received is not None:
        result.files, result.notes = received.files, received.notes
        try:
            pulled = unpack_pulled(received.values_blob, pull)
        except VariableError as exc:  # a values file the agent never writes: nothing of it is unpickled
            pulled = PulledValues()
            error = error or exc
        result.values = pulled.values
        if pulled.problems and error is None and attempt.remote_error is None and attempt.stop_reason is None \
                and attempt.setup_error is None:  # a cell that never ran defined nothing: say why it did not
            error = VariableError("; ".join(pulled.problems))
    if attempt.shown is not None:
        result.result = attempt.shown
    recorded = attempt.exit_reason
    # A cell that ended by itself before our stop reached it, with its results back, ended as it says.
    # (Not when results waited on this machine's disk until a stop: the stop ended the job, and says why.)
    ended_itself = recorded in (Reason.OK, Reason.ERROR) and received is not None and not lost
    reason = recorded if ended_itself else (attempt.stop_reason or recorded)
    rc = (attempt.exit_record or {}).get("rc")
    if error is None and received is not None and received.over_limit:
        error = ResultsTooLarge(f"results over the limit: not brought back: {received.over_limit}")
    if error is not None:
        result.status, result.error = JobStatus.FAILED, error
    elif kept and reason in (Reason.CANCELLED, Reason.IDLE) and not lost:
        pass  # %burst down, or its idle limit: a kept machine's end
    elif reason == Reason.CANCELLED:
        result.status = JobStatus.CANCELLED
        if lost:  # cancelled while results waited for this machine's disk: the ledger says which
            result.error = SyncError("cancelled" + lost_text)
    elif reason == Reason.BUDGET:
        result.status = JobStatus.BUDGET_KILLED
        result.error = BudgetKilled(f"stopped at its cost cap ({format_usd(cap)})" + lost_text)
    elif attempt.setup_error is not None:
        result.status, result.error = JobStatus.FAILED, RemoteSetupError(attempt.setup_error)
    elif reason in (Reason.DEADLINE, Reason.LEASE):
        # Before remote_error: the stop reaches the cell as KeyboardInterrupt, an effect and not the cause.
        result.status, result.error = JobStatus.FAILED, BurstError(STOP_TEXT[str(reason)] + lost_text)
    elif attempt.remote_error is not None:
        result.status, result.error = JobStatus.FAILED, attempt.remote_error
    elif reason == Reason.AGENT_DIED:
        result.status, result.error = JobStatus.FAILED, BurstError(STOP_TEXT[str(reason)])
    elif rc not in (0, None):
        result.status, result.error = JobStatus.FAILED, BurstError(f"the command exited with status {rc}")
    elif attempt.exit_record is None:
        result.status, result.error = JobStatus.FAILED, SyncError("the job ended without an exit status")
    return result
