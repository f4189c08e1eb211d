"""Fault case 8: spot preemption mid-run. The provider takes the instance (a Vast bid outbid and paused, a RunPod
spot pod reclaimed); the job notices, emits ``preempted``, ends and bills that instance on a ledger row of its own
and, with ``--retries``, relaunches on the next offer, continuing from what ``--sync-every`` last brought back.

The ``markets`` fixture checks afterwards that nothing is left running at any fake and no process on any machine.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, ledger_rows, open_reservations, run_cell, state_row, wait_until
from fault_figures import FaultLedger
from marketplaces import Markets

from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(150)]

# Resumes from the checkpoint in its rw mount: a relaunch starts where the last --sync-every pull left it.
CHECKPOINTED = """
    import os, time
    path = "out/step.txt"
    start = int(open(path).read()) if os.path.exists(path) else 0
    print("resuming at", start, flush=True)
    for step in range(start, 14):
        with open(path + ".tmp", "w") as f:
            f.write(str(step + 1))
        os.replace(path + ".tmp", path)
        print("step", step, flush=True)
        time.sleep(0.5)
    print("done", flush=True)
"""


def _events(job: Any, kind: EventType) -> list[Any]:
    return [e for e in job.events if e.type is kind]


def _instance_of(job: Any) -> str:
    return str(_events(job, EventType.PROVISIONED)[-1].instance_id)


def _preempt(markets: Markets, provider: str, instance_id: str) -> None:
    if provider == "vast":
        markets.vast.outbid(instance_id)
    else:
        markets.runpod.interrupt(instance_id)


def _synced_past_step(job: Any, tmp_path: Path, step: int) -> bool:
    """A --sync-every pull brought a checkpoint past ``step`` back into the local rw folder."""
    path = tmp_path / "out" / "step.txt"
    return bool(_events(job, EventType.SYNCED)) and path.exists() and int(path.read_text() or 0) > step


@pytest.mark.parametrize("provider", ["vast", "runpod"])
def test_a_preempted_job_finishes_on_another_offer(ip: Any, markets: Markets, tmp_path: Path, burst_home: Path,
                                                    provider: str, fault_ledger: FaultLedger) -> None:
    (tmp_path / "out").mkdir()
    options = f"--gpu RTX_4090 --spot --provider {provider} --retries 1 --sync-every 5 --max-cost 1 " \
              "--mount ./out:out:rw --background"
    result, _ = run_cell(ip, cell(options, CHECKPOINTED))
    job = result.result
    wait_until(lambda: _synced_past_step(job, tmp_path, 2), "a periodic pull past step 2", limit=60)
    first = _instance_of(job)
    _preempt(markets, provider, first)
    done = job.wait(timeout=120)

    assert done.status is JobStatus.COMPLETED, done.error
    preempted = _events(job, EventType.PREEMPTED)
    assert len(preempted) == 1 and preempted[0].instance_id == first
    second = _instance_of(job)
    assert second != first
    stdout = "".join(e.text or "" for e in _events(job, EventType.OUTPUT) if e.stream == "stdout")
    resumed = [int(line.split()[-1]) for line in stdout.splitlines() if line.startswith("resuming at")]
    assert resumed[0] == 0 and resumed[1] > 2, stdout  # the relaunch continued from the pulled checkpoint
    assert stdout.rstrip().endswith("done")
    assert (tmp_path / "out" / "step.txt").read_text() == "14"

    rows = sorted((r for r in ledger_rows(burst_home) if r.job_id == job.id), key=lambda r: r.attempt)
    assert [(r.attempt, r.status, r.instance_id) for r in rows] == [(1, "preempted", first), (2, "completed", second)]
    assert all(r.actual_usd is not None and r.actual_usd > 0 for r in rows)  # both attempts billed
    total = sum((r.actual_usd for r in rows), Decimal(0))
    assert total == done.total_cost_usd and total <= Decimal(1)
    assert open_reservations(burst_home) == []
    assert state_row(burst_home, job.id).state == "terminated"
    bills = fault_ledger.check_clouds("8 preemption, --retries 1", markets, Decimal(1), faults=1)
    assert len(bills) == 2 and sum(bills.values()) <= total  # both instances billed; the ledger never under


def test_without_retries_a_preemption_fails_clearly_and_bills_the_attempt(ip: Any, markets: Markets, tmp_path: Path,
                                                                           burst_home: Path,
                                                                           fault_ledger: FaultLedger) -> None:
    (tmp_path / "out").mkdir()
    options = "--gpu RTX_4090 --spot --provider vast --max-cost 1 --mount ./out:out:rw --background"
    result, _ = run_cell(ip, cell(options, CHECKPOINTED))
    job = result.result
    wait_until(lambda: any("step 1" in (e.text or "") for e in _events(job, EventType.OUTPUT)), "step 1")
    first = _instance_of(job)
    markets.vast.outbid(first)
    done = job.wait(timeout=90)

    assert done.status is JobStatus.FAILED
    assert "--retries N relaunches on the next offer" in str(done.error)
    assert len(_events(job, EventType.PREEMPTED)) == 1
    (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job.id]
    assert (row.status, row.instance_id) == ("preempted", first) and row.actual_usd > 0
    assert open_reservations(burst_home) == []
    fault_ledger.check_clouds("8 preemption, no retries", markets, Decimal(1), faults=1)
