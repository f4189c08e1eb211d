"""Fault cases 12 and 13 (issue 9): a stop is enforced, not requested.

A client's ``stop`` is a request to the agent. When the instance does not answer it (every process of the fake
machine frozen with SIGSTOP: its sshd, the agent's front and supervisor, the cell; or only the agent's supervisor),
the job must still end within its cap: a stop the agent has not confirmed within a short grace becomes a terminate
through the provider's API, in the job's own ``finally`` and in the reaper (``burst.shutdown()``) alike, and the
job says what was not brought back. A first stop never switches the limits off: a cancel whose results never come
back is still ended at the cap. Each case runs on every marketplace fake, with repeated trials, and ends with the
fakes' bills against the cap.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import ledger_rows, live_instances, wait_until
from fakes.base import FakeMachine
from fault_figures import FaultLedger
from marketplaces import GPU, Markets, cap_buying, set_rate
from ssh_boxes import output_lines
from sshd import descendants

import burst_jupyter as burst
from burst_jupyter.budget import LedgerRow
from burst_jupyter.job import Job, JobStatus
from burst_jupyter.spec import JobSpec
from burst_jupyter.stop_policy import STOP_GRACE_SECONDS

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(180)]

PROVIDERS = ["vast", "runpod", "thunder", "lambda"]
RATE = Decimal(36)
TRIALS = 2
# Writes into its rw mount, then runs until stopped. On the stop (the agent has confirmed it by then: its note comes
# before the interrupt) it says so and holds out until the agent's SIGKILL, 6 s later.
CELL = """
import signal, time
open("out/partial.txt", "w").write("written")
print("running", flush=True)
try:
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("interrupted", flush=True)
    time.sleep(1)
    print("holding out", flush=True)
    while True:
        time.sleep(0.05)
"""


def submit(markets: Markets, provider: str, cap: Decimal, n: int) -> Job:
    (Path.cwd() / "out").mkdir(exist_ok=True)
    spec = JobSpec(cell=CELL, provider=provider, gpu_model=GPU[provider], max_cost_usd=cap, name=f"trial{n}",
                   offer=set_rate(markets, provider, RATE), mount_local=["./out:out:rw"])
    return burst.submit(spec, namespace={})


def machine_of(markets: Markets, provider: str, job: Job) -> FakeMachine:
    """The fake machine whose home holds ``job``'s directory."""
    for machine in markets.all[provider].machines.all:
        if (machine.home / ".cache/burst/jobs" / job.id).is_dir():
            return machine
    raise AssertionError(f"no machine runs {job.id}")


def every_process(machine: FakeMachine) -> list[int]:
    """Its sshd and every session under it, and the detached agent supervisor and cell (their HOME is its home)."""
    assert machine.server is not None
    return sorted(set(descendants([machine.server.pid])) | set(machine.processes()))


def supervisor(machine: FakeMachine, job: Job) -> list[int]:
    return [int((machine.home / ".cache/burst/jobs" / job.id / "supervisor.pid").read_text())]


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` (an instance that stops answering: a hung kernel module, a host swapping to death); they are
    let go at the end, if the provider's terminate has not killed them by then."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def said(job: Job, text: str) -> bool:
    return any(text in line for _, line in output_lines(job))


def start_trials(markets: Markets, provider: str, cap: Decimal) -> list[Job]:
    jobs = [submit(markets, provider, cap, n) for n in range(TRIALS)]
    for job in jobs:
        wait_until(lambda job=job: said(job, "running"), "the cell to run", limit=90)
    return jobs


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_frozen_instance_is_ended_through_the_provider_within_the_cap(
        provider: str, markets: Markets, fault_ledger: FaultLedger, burst_home: Path) -> None:
    """Every process of the machine frozen once the cell runs: the budget stop is never confirmed, and the job ends
    through the provider's terminate before the money for it is gone."""
    cap = cap_buying(RATE, provider, spare=3.0)
    jobs = start_trials(markets, provider, cap)
    with frozen([pid for job in jobs for pid in every_process(machine_of(markets, provider, job))]):
        results = [job.wait(90) for job in jobs]
    for job, result in zip(jobs, results, strict=True):
        assert result.status is JobStatus.BUDGET_KILLED, result.error
        assert "not brought back: changes in out (rw mount of out)" in str(result.error)
        assert said(job, f"ending the instance through {provider}'s API")
        (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job.id]
        assert row.actual_usd is not None and row.actual_usd <= cap and "not brought back" in (row.message or "")
    fault_ledger.check_clouds("12 frozen instance", markets, cap, faults=TRIALS, trials=TRIALS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_frozen_agent_does_not_hold_a_cancel_up(provider: str, markets: Markets, fault_ledger: FaultLedger,
                                                  burst_home: Path) -> None:
    """Only the agent's supervisor frozen: the cancel reaches the instance but nothing confirms it; after the grace
    the instance is ended through the provider, long before the cap, and the job says what it lost."""
    cap = Decimal(1)  # far away: only the grace can end these jobs
    jobs = start_trials(markets, provider, cap)
    with frozen([pid for job in jobs for pid in supervisor(machine_of(markets, provider, job), job)]):
        for job in jobs:
            job.cancel()
        results = [job.wait(60) for job in jobs]
    for job, result in zip(jobs, results, strict=True):
        assert result.status is JobStatus.CANCELLED
        assert "not brought back: changes in out" in str(result.error)
        assert said(job, f"the agent did not confirm the stop within {STOP_GRACE_SECONDS:.0f} s")
    fault_ledger.check_clouds("13 frozen agent", markets, cap, faults=TRIALS, trials=TRIALS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cancel_whose_results_never_come_is_still_ended_at_the_cap(
        provider: str, markets: Markets, fault_ledger: FaultLedger) -> None:
    """The agent confirms the cancel (the cell says it was interrupted), then the whole machine freezes: the results
    never come. The cap still holds after that first stop: the instance is ended through the provider."""
    cap = cap_buying(RATE, provider, spare=6.0)
    jobs = start_trials(markets, provider, cap)
    for job in jobs:
        job.cancel()
    for job in jobs:
        wait_until(lambda job=job: said(job, "interrupted"), "the agent to stop the cell", limit=30)
    with frozen([pid for job in jobs for pid in every_process(machine_of(markets, provider, job))]):
        results = [job.wait(90) for job in jobs]
    for job, result in zip(jobs, results, strict=True):
        assert result.status is JobStatus.CANCELLED
        assert "not brought back" in str(result.error)
        assert said(job, "leaves only the terminate")
    fault_ledger.check_clouds("12 frozen during a cancel", markets, cap, faults=TRIALS, trials=TRIALS)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("when", ["before", "after"])
def test_the_reaper_never_waits_on_a_frozen_instance(when: str, provider: str, markets: Markets,
                                                     fault_ledger: FaultLedger, burst_home: Path) -> None:
    """``burst.shutdown()`` hands the jobs to the reaper (a process of its own, which renews the lease while it
    waits), and the machines freeze: before its stop, which is then never confirmed (the grace ends the wait), or
    once the agent has stopped the cell, so the results never come (the cap ends the wait). Either way the reaper
    ends the instances through the provider's API within the cap, and settles them saying what was lost."""
    cap = cap_buying(RATE, provider, spare=10.0)
    jobs = start_trials(markets, provider, cap)
    machines = [machine_of(markets, provider, job) for job in jobs]
    stopped_first = when == "after"
    if stopped_first:
        burst.shutdown()
        for machine, job in zip(machines, jobs, strict=True):
            log = machine.home / ".cache/burst/jobs" / job.id / "events.jsonl"
            wait_until(lambda log=log: "holding out" in log.read_text(), "the reaper's stop to reach the cell",
                       limit=30)
    with frozen([pid for machine in machines for pid in every_process(machine)]):
        if not stopped_first:
            burst.shutdown()
        fault_ledger.check_clouds(f"12 frozen, reaper {when} its stop", markets, cap, faults=TRIALS,
                                  trials=TRIALS)

    def settled() -> list[LedgerRow]:
        return [r for r in ledger_rows(burst_home) if r.job_id in {job.id for job in jobs}]

    wait_until(lambda: len(settled()) == TRIALS, "the reaper to settle both", limit=60)  # after it marks them ended
    assert live_instances(burst_home) == []
    rows = settled()
    why = "leaves only the terminate" if stopped_first else "did not confirm the stop"
    assert all(why in (r.message or "") and "not brought back" in (r.message or "") for r in rows), rows
    assert all(r.actual_usd is not None and r.actual_usd <= cap for r in rows)
