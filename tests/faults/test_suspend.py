"""Fault case 14 (issue 9): the laptop sleeps across the cap.

While a Linux or macOS laptop is suspended nothing in the kernel runs, the monotonic clock stands still and the
wall clock runs on, and so does the rented instance's bill. The simulated suspend is all three: the session's loop
is blocked (no lease, no cap check, no stop), the session's injected clock (:class:`Laptop`) stops its monotonic
time for as long, and the fakes bill on. The instance must not outlive the job's money meanwhile: its agent stops
the cell and ends it with its own scoped key (Vast, RunPod: Thunder gives an instance no such key, so there an
orphan waits for reconciliation, as the README says). On resume the job is stopped at once, and the ledger shows
the money on the wall clock, never less than the provider billed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import ledger_rows, wait_until
from fault_figures import FaultLedger
from marketplaces import GPU, Markets, cap_buying, set_rate
from ssh_boxes import output_lines

import burst_jupyter as burst
from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus
from burst_jupyter.session import Session
from burst_jupyter.spec import JobSpec

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(180)]

RATE = Decimal(36)
TRIALS = 2
CELL = "import time\nprint('running', flush=True)\ntime.sleep(600)\n"


class Laptop:
    """A laptop's clocks (:class:`burst_jupyter.meter.Clock`) and its lid: across :meth:`suspend` the wall clock
    runs on and the monotonic clock does not."""

    def __init__(self) -> None:
        self._slept = 0.0  # monotonic seconds spent suspended, which this laptop's monotonic clock never saw
        self._lock = threading.Lock()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        with self._lock:
            return time.monotonic() - self._slept

    def suspend(self, session: Session, until: Callable[[], bool], *, limit: float) -> bool:
        """Block the session's loop until ``until()`` (or ``limit`` seconds). True if ``until()`` came true."""
        woke = threading.Event()
        came: list[bool] = []

        def asleep() -> None:  # on the loop: nothing else on it runs meanwhile
            start = time.monotonic()
            while not until() and time.monotonic() - start < limit:
                time.sleep(0.05)
            came.append(until())
            with self._lock:
                self._slept += time.monotonic() - start
            woke.set()

        session.loop.call_soon_threadsafe(asleep)
        woke.wait()
        return came[0]


@pytest.mark.parametrize("provider", ["vast", "runpod"])
def test_a_job_whose_money_ran_out_in_a_suspend_is_ended_and_billed_on_the_wall_clock(
        provider: str, markets: Markets, fault_ledger: FaultLedger, burst_home: Path) -> None:
    session = Session.current()
    laptop = Laptop()
    session.clock = laptop
    cap = cap_buying(RATE, provider, spare=3.0)  # the budget stop would come ~10 s after the create request
    jobs = [burst.submit(JobSpec(cell=CELL, provider=provider, gpu_model=GPU[provider], max_cost_usd=cap,
                                 offer=set_rate(markets, provider, RATE), name=f"trial{n}"), namespace={})
            for n in range(TRIALS)]
    for job in jobs:
        wait_until(lambda job=job: ("stdout", "running") in output_lines(job), "the cell to run", limit=90)
    cloud = markets.all[provider]
    # The lid closes with the cell running and opens once the instances are gone: only their agents can end them.
    assert laptop.suspend(session, lambda: cloud.running() == [], limit=60), "the instances outlived their money"
    results = [job.wait(60) for job in jobs]
    bills = cloud.bills()
    for job, result in zip(jobs, results, strict=True):
        assert result.status is JobStatus.BUDGET_KILLED, result.error
        (instance_id,) = {e.instance_id for e in job.events if e.type is EventType.PROVISIONED}
        (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job.id]
        assert row.actual_usd is not None and bills[str(instance_id)] <= row.actual_usd <= cap
        assert result.total_cost_usd == row.actual_usd
    fault_ledger.check_clouds("14 suspend", markets, cap, faults=TRIALS, trials=TRIALS)
