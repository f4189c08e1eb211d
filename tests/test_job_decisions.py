"""The pure pieces of a job's run (issue 11), driven by a clock of the test's own: no real time passes.

When to stop (stop_policy.Limits over a Meter), what each agent record means (attempt.Attempt.take), what the stream
loop does on each tick (follow.Follower), how the job ended (outcome.decide_result) and its cap (job.decide_cap).
The jobs that carry them out, against real processes, are in test_magic_jobs.py, test_api.py and tests/faults/.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from burst_jupyter.attempt import Attempt, Notice, agent_died
from burst_jupyter.errors import (
    BudgetKilled,
    BurstError,
    ConfigError,
    RemoteError,
    RemoteSetupError,
    ResultsTooLarge,
    SyncError,
)
from burst_jupyter.events import EventType
from burst_jupyter.follow import CANCEL_RECONNECT_SECONDS, Follower, Step
from burst_jupyter.job import JobStatus, cost_of, decide_cap
from burst_jupyter.meter import Meter
from burst_jupyter.outcome import decide_result
from burst_jupyter.stop_policy import STOP_GRACE_SECONDS, Limits, StopState, terminate_reserve
from burst_jupyter.sync_back import Received

RATE = Decimal(3600)  # $1 a second: a dollar is a second
T0 = 1_000_000.0


class Clock:
    """Both clocks, moved by the test (across a suspend only ``wall`` would move)."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 50.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def limits(clock: Clock, *, cap: str = "30", spent: str = "0", rate: Decimal = RATE, since: float | None = T0,
           first_launch: float | None = T0, max_seconds: float = 600.0, sync_up: float = 0.0) -> Limits:
    meter = Meter(rate=rate, cap=Decimal(cap), since=since, spent=Decimal(spent), clock=clock)
    return Limits(meter=meter, first_launch=first_launch, max_seconds=max_seconds, teardown_seconds=1.0,
                  sync_up_seconds=sync_up)


# -- when to stop -------------------------------------------------------------------------------------------


def test_the_budget_stop_comes_when_only_the_reserve_is_left_and_seconds_left_counts_down_to_it() -> None:
    clock = Clock()
    # Kept back: the terminate (1 s), the results' way back (at least 1 s) and the agent's answer (2 s).
    assert limits(clock).reserve_seconds() == 4.0
    assert limits(clock).seconds_left() == 26.0
    clock.advance(25.5)
    assert limits(clock).seconds_left() == 0.5
    assert limits(clock).should_stop(cancelled=False) is None
    clock.advance(0.5)
    assert limits(clock).seconds_left() == 0.0
    assert limits(clock).should_stop(cancelled=False) == "budget"
    assert limits(clock).out_of_time_or_money(cancelled=False) == "budget"
    # A stop is under way: the instance is not ended through the API while the answer and results are paid for.
    assert limits(clock).must_end(StopState(sent=clock.monotonic())) is None


def test_a_slow_upload_keeps_more_back_for_the_results() -> None:
    clock = Clock()
    assert limits(clock, sync_up=5.0).reserve_seconds() == 8.0
    clock.advance(22.0)
    assert limits(clock, sync_up=5.0).should_stop(cancelled=False) == "budget"
    assert limits(clock).should_stop(cancelled=False) is None


def test_the_instance_is_ended_through_the_api_once_the_money_left_buys_only_the_terminate() -> None:
    clock = Clock()
    last = 30.0 - terminate_reserve(1.0)
    clock.advance(last - 0.01)
    assert limits(clock).must_end(StopState()) is None
    clock.advance(0.01)
    assert limits(clock).must_end(StopState()) == "budget"


def test_earlier_attempts_count_against_the_cap() -> None:
    clock = Clock()
    assert limits(clock, spent="10").seconds_left() == 16.0
    clock.advance(16.0)
    assert limits(clock, spent="10").should_stop(cancelled=False) == "budget"
    assert limits(clock).should_stop(cancelled=False) is None


def test_a_suspend_moves_the_wall_clock_at_once_and_the_money_with_it() -> None:
    clock = Clock()
    clock.wall += 90  # the laptop slept: its monotonic clock did not see it
    assert limits(clock).should_stop(cancelled=False) == "budget"
    assert limits(clock).must_end(StopState()) == "budget"
    assert limits(clock).seconds_left() == 0.0


def test_the_maximum_duration_counts_from_the_first_create_request() -> None:
    clock = Clock()
    free = dict(rate=Decimal(0), max_seconds=60.0)
    assert limits(clock, **free).seconds_left() == 60.0
    clock.advance(60.0)
    assert limits(clock, **free).should_stop(cancelled=False) is None  # not over yet
    clock.advance(0.5)
    assert limits(clock, **free).should_stop(cancelled=False) == "deadline"
    assert limits(clock, **free).must_end(StopState()) is None  # the stop gets its reserve
    clock.advance(limits(clock, **free).reserve_seconds())
    assert limits(clock, **free).must_end(StopState()) == "deadline"
    # A relaunch's own create request does not restart the maximum duration.
    assert limits(clock, since=clock.wall, **free).should_stop(cancelled=False) == "deadline"


def test_nothing_bills_at_zero_rate_and_before_the_create_request() -> None:
    clock = Clock()
    assert limits(clock, rate=Decimal(0), first_launch=None).seconds_left() is None
    assert limits(clock, since=None, first_launch=None).seconds_left() is None
    clock.advance(10_000)
    assert limits(clock, rate=Decimal(0), first_launch=None).should_stop(cancelled=False) is None


def test_a_cancel_is_asked_first_and_is_not_out_of_money() -> None:
    clock = Clock()
    clock.advance(29.0)
    assert limits(clock).should_stop(cancelled=True) == "cancelled"
    assert limits(clock).out_of_time_or_money(cancelled=True) is None
    assert limits(clock).out_of_time_or_money(cancelled=False) == "budget"


def test_a_stop_never_confirmed_and_a_cancels_last_chance_end_the_instance() -> None:
    clock = Clock()
    sent = StopState(sent=clock.monotonic())
    clock.mono += STOP_GRACE_SECONDS
    assert limits(clock).must_end(sent) is None
    clock.mono += 0.01
    assert limits(clock).must_end(sent) == "unconfirmed"
    assert limits(clock).must_end(StopState(sent=sent.sent, confirmed=True)) is None
    assert limits(clock).must_end(StopState(cancel_by=clock.monotonic() - 0.01)) == "cancelled"
    assert limits(clock).must_end(StopState(cancel_by=clock.monotonic() + 1)) is None


# -- the job's cap ------------------------------------------------------------------------------------------


def test_the_cap_is_max_cost_else_the_rate_for_the_whole_maximum_duration() -> None:
    assert decide_cap(Decimal(5), Decimal("0.4"), 3600.0, 1.0) == Decimal(5)
    assert decide_cap(None, Decimal("0.4"), 3600.0, 1.0) == cost_of(Decimal("0.4"), 3600.0) == Decimal("0.4")
    assert decide_cap(Decimal(11), RATE, 3600.0, 1.0) == Decimal(11)  # 10 s to start and stop, 1 s to terminate
    with pytest.raises(ConfigError, match=r"--max-cost \$10.9 buys only 11 s .* too little to start and stop"):
        decide_cap(Decimal("10.9"), RATE, 3600.0, 1.0)


# -- following the agent's records --------------------------------------------------------------------------


def test_records_become_what_the_job_view_is_told() -> None:
    attempt = Attempt()
    assert attempt.take({"k": "out", "s": "stderr", "d": "warn\n"}) == [
        Notice(EventType.OUTPUT, {"stream": "stderr", "text": "warn\n"})]
    assert attempt.take({"k": "out", "s": "tty?", "d": 5}) == [Notice(EventType.OUTPUT, {"stream": "stdout",
                                                                                         "text": "5"})]
    assert attempt.take({"k": "progress", "p": 40, "m": "epoch 2"}) == [
        Notice(EventType.PROGRESS, {"percent": 40, "message": "epoch 2"})]
    assert attempt.take({"k": "started"}) == [Notice(EventType.STARTED)] and attempt.started
    assert attempt.take({"k": "result", "data": {"text/plain": "42"}}) == []
    assert attempt.shown is not None
    assert attempt.take({"k": "result", "data": "not a bundle"}) == []
    assert attempt.take({"k": "error", "ename": "ValueError", "evalue": "boom", "tb": ["line"]}) == []
    assert attempt.remote_error is not None and attempt.remote_error.ename == "ValueError"
    assert attempt.take({"k": "no such kind"}) == []
    assert attempt.exit_record is None and not attempt.stop.confirmed


def test_the_agents_own_stop_is_said_once_and_ours_is_confirmed() -> None:
    theirs = Attempt()
    assert theirs.take({"k": "note", "m": "stopping: lease"}) == [
        Notice(EventType.STOPPING, {"message": "the agent's lease lapsed (the client went silent)"})]
    assert theirs.stop_reason == "lease" and theirs.stop.confirmed
    assert theirs.take({"k": "note", "m": "stopping: lease"}) == []
    assert theirs.take({"k": "note", "m": "something else"}) == []

    ours = Attempt(stop_reason="budget", stop=StopState(sent=3.0))
    assert ours.take({"k": "note", "m": "stopping: budget"}) == []
    assert ours.stop == StopState(sent=3.0, confirmed=True) and ours.stop_reason == "budget"


def test_the_exit_record_ends_the_cell_and_an_agent_that_died_is_asked_about() -> None:
    attempt = Attempt()
    exit_record = {"k": "exit", "reason": "agent-died", "rc": None}
    assert attempt.take(exit_record) == [Notice(EventType.SYNCING_DOWN)]
    assert attempt.exit_record == exit_record and attempt.stop.confirmed and attempt.exit_reason == "agent-died"
    assert agent_died(exit_record) and not agent_died({"k": "exit", "reason": "ok"})
    assert not agent_died({"k": "note", "reason": "agent-died"})


def test_a_setup_error_is_kept() -> None:
    attempt = Attempt()
    assert attempt.take({"k": "setup-error", "m": "no GPU"}) == []
    assert attempt.setup_error == "no GPU"


def test_a_relaunch_is_a_new_attempt_that_remembers_nothing_of_the_last() -> None:
    lost = Attempt(number=2, started=True, stop_reason="budget", stop=StopState(sent=1.0, confirmed=True),
                   exit_record={"k": "exit"}, setup_error="x")
    assert lost.next() == Attempt(number=3)


# -- how the job ended --------------------------------------------------------------------------------------


def ended(reason: str | None, rc: int | None = 0, **fields: object) -> Attempt:
    exit_record = None if reason is None else {"k": "exit", "reason": reason, "rc": rc}
    return Attempt(exit_record=exit_record, **fields)  # type: ignore[arg-type]


def status(attempt: Attempt, error: BaseException | None = None, *, lost: str | None = None,
           total: Decimal | None = Decimal(1)) -> tuple[JobStatus, BaseException | None]:
    result = decide_result("j", attempt, error, total, pull=[], cap=Decimal("2.5"), lost=lost)
    assert result.total_cost_usd == total
    return result.status, result.error


def test_a_cell_that_ran_to_its_end_completed() -> None:
    assert status(ended("ok", received=Received())) == (JobStatus.COMPLETED, None)


def test_the_command_exit_status_and_a_missing_exit_fail_the_job() -> None:
    got, error = status(ended("ok", rc=3, received=Received()))
    assert got is JobStatus.FAILED and isinstance(error, BurstError) and str(error) == \
        "the command exited with status 3"
    got, error = status(ended(None))
    assert got is JobStatus.FAILED and isinstance(error, SyncError) and "without an exit status" in str(error)


def test_an_error_that_ended_the_run_fails_the_job_whatever_the_agent_said() -> None:
    boom = ConfigError("boom")
    assert status(ended("budget", stop_reason="budget"), boom) == (JobStatus.FAILED, boom)


def test_our_stop_decides_unless_the_cell_ended_by_itself_with_its_results_back() -> None:
    got, error = status(ended("budget", rc=None, stop_reason="budget"))
    assert got is JobStatus.BUDGET_KILLED and isinstance(error, BudgetKilled)
    assert str(error) == "stopped at its cost cap ($2.50)"
    # The cell ended by itself before the stop reached it, and its results came back: it ended as it says.
    assert status(ended("ok", stop_reason="budget", received=Received())) == (JobStatus.COMPLETED, None)
    # Its results waited on this machine's disk until the stop: the stop ended the job, and says what is lost.
    got, error = status(ended("ok", stop_reason="budget", received=Received()), lost="out/a.bin")
    assert got is JobStatus.BUDGET_KILLED and str(error) == \
        "stopped at its cost cap ($2.50); not brought back: out/a.bin"


def test_a_cancel_and_what_it_left_behind() -> None:
    assert status(ended("cancelled", rc=None, stop_reason="cancelled")) == (JobStatus.CANCELLED, None)
    got, error = status(ended(None, stop_reason="cancelled"), lost="changes in out")
    assert got is JobStatus.CANCELLED and isinstance(error, SyncError)
    assert str(error) == "cancelled; not brought back: changes in out"


def test_the_deadline_and_the_lease_come_before_the_keyboard_interrupt_they_caused() -> None:
    interrupt = RemoteError("KeyboardInterrupt", "", [])
    got, error = status(ended("deadline", rc=None, stop_reason="deadline", remote_error=interrupt))
    assert got is JobStatus.FAILED and str(error) == "reached its maximum duration"
    got, error = status(ended("lease", rc=None, remote_error=interrupt))
    assert got is JobStatus.FAILED and str(error) == "the agent's lease lapsed (the client went silent)"
    assert status(ended("error", rc=None, remote_error=interrupt, received=Received())) == \
        (JobStatus.FAILED, interrupt)


def test_a_setup_error_and_an_agent_that_died() -> None:
    got, error = status(ended("setup-error", rc=None, setup_error="no GPU"))
    assert got is JobStatus.FAILED and isinstance(error, RemoteSetupError) and str(error) == "no GPU"
    got, error = status(ended("agent-died", rc=None))
    assert got is JobStatus.FAILED and str(error) == "the agent on the instance died"


def test_results_over_the_limit_fail_a_job_that_otherwise_completed() -> None:
    got, error = status(ended("ok", received=Received(over_limit="big.bin (2 GB)")))
    assert got is JobStatus.FAILED and isinstance(error, ResultsTooLarge)
    assert str(error) == "results over the limit: not brought back: big.bin (2 GB)"


def test_the_result_carries_what_came_back_and_an_unknown_bill_stays_unknown() -> None:
    received = Received(notes=["kept yours"])
    attempt = ended("ok", received=received)
    attempt.take({"k": "result", "data": {"text/plain": "42"}})
    result = decide_result("j", attempt, None, None, pull=[], cap=Decimal(1), lost=None)
    assert (result.status, result.total_cost_usd, result.notes) == (JobStatus.COMPLETED, None, ["kept yours"])
    assert result.result is attempt.shown


# -- the stream loop's steps --------------------------------------------------------------------------------


def kinds(steps: list[Step]) -> list[tuple[str, str | None]]:
    return [(s.kind, s.reason) for s in steps]


def test_the_lease_is_renewed_every_quarter_of_it_and_pulls_wait_for_the_cell_and_each_other() -> None:
    clock = Clock()
    follower = Follower.start(lease_seconds=40, sync_every=30, now=clock.monotonic())
    attempt = Attempt()

    def steps(*, pulling: bool = False) -> list[tuple[str, str | None]]:
        return kinds(follower.steps(clock.monotonic(), attempt, limits(clock, cap="1000"), cancelled=False,
                                    pulling=pulling))

    assert steps() == []
    clock.advance(10)
    assert steps() == [("lease", None)]
    assert steps() == []
    clock.advance(20)
    assert steps() == [("lease", None)]  # not started yet: nothing to pull
    attempt.take({"k": "started"})
    assert steps(pulling=True) == []  # the last pull is still under way
    assert steps() == [("pull", None)]
    assert steps() == []
    clock.advance(10)
    assert steps() == [("lease", None)]
    assert Follower.start(lease_seconds=0, sync_every=None, now=0).lease_every is None
    assert Follower.start(lease_seconds=600, sync_every=None, now=0).lease_every == 20.0


def test_the_stop_is_sent_once_and_a_late_cancel_gets_a_last_chance() -> None:
    clock = Clock()
    follower = Follower.start(lease_seconds=None, sync_every=None, now=clock.monotonic())
    attempt = Attempt()
    clock.advance(26.0)  # the budget stop (test_the_budget_stop_comes_when_only_the_reserve_is_left...)
    assert kinds(follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=False, pulling=False)) == [
        ("stop", "budget")]
    assert attempt.stop_reason == "budget" and attempt.stop == StopState(sent=clock.monotonic())
    assert follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=False, pulling=False) == []
    assert kinds(follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=True, pulling=False)) == [
        ("cancel-late", None)]
    assert attempt.stop.cancel_by == clock.monotonic() + CANCEL_RECONNECT_SECONDS
    assert follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=True, pulling=False) == []
    attempt.take({"k": "note", "m": "stopping: budget"})
    clock.mono += CANCEL_RECONNECT_SECONDS + 0.01  # the answer came, the results did not
    assert kinds(follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=True, pulling=False)) == [
        ("end", "cancelled")]


def test_a_stop_the_agent_never_confirms_ends_the_instance_and_the_lease_still_goes_first() -> None:
    clock = Clock()
    follower = Follower.start(lease_seconds=4, sync_every=None, now=clock.monotonic())
    attempt = Attempt()
    assert kinds(follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=True, pulling=False)) == [
        ("stop", "cancelled")]
    clock.mono += STOP_GRACE_SECONDS + 0.01
    assert kinds(follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=True, pulling=False)) == [
        ("lease", None), ("end", "unconfirmed")]


def test_once_the_cell_is_over_only_the_results_remain() -> None:
    clock = Clock()
    follower = Follower.start(lease_seconds=None, sync_every=1, now=clock.monotonic())
    attempt = Attempt()
    attempt.take({"k": "started"})
    attempt.take({"k": "exit", "reason": "ok", "rc": 0})
    clock.advance(26.0)
    assert follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=False, pulling=False) == []
    assert attempt.stop_reason is None  # no stop for a cell that ended: its results are on their way
    # Some could not be written here: asked again when due, never past the cap.
    attempt.received = Received(unwritten=["out/big.bin"])
    follower.refetch_at = clock.monotonic() + 5
    assert follower.steps(clock.monotonic(), attempt, limits(clock, cap="1000"), cancelled=False,
                          pulling=False) == []
    clock.mono += 5
    assert kinds(follower.steps(clock.monotonic(), attempt, limits(clock, cap="1000"), cancelled=False,
                                pulling=False)) == [("refetch", None)]
    assert follower.refetch_at is None
    assert kinds(follower.steps(clock.monotonic(), attempt, limits(clock), cancelled=False, pulling=False)) == [
        ("give-up", "budget")]
    assert kinds(follower.steps(clock.monotonic(), attempt, limits(clock, cap="1000"), cancelled=True,
                                pulling=False)) == [("give-up", "cancelled")]
