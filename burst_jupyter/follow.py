"""Following the agent's stream (:class:`Follower`), as pure code: after each record, results transfer or tick, the
steps the stream loop takes now, in order (renew the lease, end the instance through the API, give up on results
this machine could not write, fetch them again, pull --sync-every changes, send a stop). The loop (remote_run.py)
carries them out; a test asks with its own clock and limits.

Example:
    >>> follower = Follower.start(lease_seconds=60, sync_every=None, now=0.0)
    >>> follower.lease_every
    15.0
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .agent import Reason
from .attempt import Attempt
from .stop_policy import Limits

__all__ = ["CANCEL_RECONNECT_SECONDS", "Follower", "Step"]

# A cancel that comes while another stop is under way (or during an outage) gives the results this long.
CANCEL_RECONNECT_SECONDS = 15.0


@dataclass(frozen=True)
class Step:
    """One thing the stream loop does. ``reason``: why the instance is ended (``end``, from
    :meth:`Limits.must_end`), or the stop's reason (``give-up``, ``stop``)."""

    kind: Literal["lease", "end", "give-up", "refetch", "pull", "stop", "cancel-late"]
    reason: str | None = None


@dataclass
class Follower:
    """The stream loop's timers (monotonic seconds: these are waits, not money)."""

    lease_every: float | None  # how often the lease is renewed (None: the job has no lease)
    sync_every: float | None  # how often --sync-every pulls the rw changes (None: never)
    last_lease: float
    last_pull: float
    refetch_at: float | None = None  # results are missing here (a local write error): ask again then

    @classmethod
    def start(cls, *, lease_seconds: float | None, sync_every: float | None, now: float) -> Follower:
        lease_every = min(max(lease_seconds / 4, 1.0), 20.0) if lease_seconds else None
        return cls(lease_every=lease_every, sync_every=sync_every or None, last_lease=now, last_pull=now)

    def steps(self, now: float, attempt: Attempt, limits: Limits, *, cancelled: bool, pulling: bool) -> list[Step]:
        """What to do now. Updates the timers, and the attempt's stop when one is sent; ``pulling``: a pull is
        still under way."""
        steps: list[Step] = []
        if self.lease_every and now - self.last_lease >= self.lease_every:
            # Also while the results come back: the agent's watchdog outlives the cell until they are fetched.
            self.last_lease = now
            steps.append(Step("lease"))
        end = limits.must_end(attempt.stop)
        if end is not None:
            return [*steps, Step("end", end)]
        if attempt.exit_record is not None:  # the cell is over: only the results remain
            if attempt.received is not None and attempt.received.unwritten:
                # Waiting on this machine's disk, never past the cap, the maximum duration or a cancel.
                reason = limits.should_stop(cancelled=cancelled)
                if reason is not None:
                    return [*steps, Step("give-up", reason)]
                if self.refetch_at is not None and now >= self.refetch_at:
                    self.refetch_at = None
                    steps.append(Step("refetch"))
            return steps
        if self.sync_every and attempt.started and now - self.last_pull >= self.sync_every and not pulling:
            self.last_pull = now
            steps.append(Step("pull"))
        if attempt.stop_reason is None:
            reason = limits.should_stop(cancelled=cancelled)
            if reason is not None:
                attempt.stop_reason = reason
                attempt.stop = replace(attempt.stop, sent=now)
                steps.append(Step("stop", reason))
        elif attempt.stop_reason != Reason.CANCELLED and attempt.stop.cancel_by is None and cancelled:
            # Cancelled while another stop is under way: a short last chance for the results, then the end.
            attempt.stop = replace(attempt.stop, cancel_by=now + CANCEL_RECONNECT_SECONDS)
            steps.append(Step("cancel-late"))
        return steps
