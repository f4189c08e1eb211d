"""Fault case 11: 50 randomised runs near their cost cap; the billed cost never exceeds ``--max-cost``.

Each run draws a provider, a rate (a Vast offer of its own; RunPod's price for the GPU at its create; Thunder's
list price, drawn once: its status calls price an instance from the current table), a boot delay, a cap that buys
a few seconds more than the least a job may be given (``check_cap``), and a cell that sleeps well under what the
cap buys, near the point where the job must be stopped to keep the teardown inside the cap, or beyond what the cap
buys at all. Runs go ten at a time through the Python API against the provider fakes, whose instances are real
sshd processes.

For every run: the fake's bill (the billed rate from the create call to the destroy) is within the cap and not
above what the ledger says; a cell that sleeps past what the cap buys ends ``budget_killed``; a completed cell
printed its last line and a stopped one did not. The seed is printed and may be replayed with
``BURST_FAULT_SEED=<seed>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import ledger_rows, open_reservations, wait_until
from fault_figures import FaultLedger
from marketplaces import GPU, TEARDOWN, THUNDER_SPEC, Markets, cap_buying, set_rate
from ssh_boxes import output_lines
from sshd import connection_pids, descendants

import burst_jupyter as burst
from burst_jupyter.events import EventType
from burst_jupyter.job import Job, JobStatus
from burst_jupyter.providers import ProviderConfig
from burst_jupyter.session import Session
from burst_jupyter.spec import JobSpec

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(240)]

SEED = int(os.environ.get("BURST_FAULT_SEED") or 20261123)
RUNS = 50
AT_ONCE = 10  # jobs in flight: each is an sshd, an agent and a cell on this machine
CELL = "import time\nprint('start', flush=True)\ntime.sleep({sleep:.2f})\nprint('done', flush=True)\n"


@dataclass
class Run:
    n: int
    provider: str
    rate: Decimal  # $/h
    cap: Decimal
    boot_delay: float
    kind: str  # short | near | over (the cap)
    sleep: float
    offer: str | None = None  # Vast: the run's own offer
    job: Job | None = field(default=None, repr=False)

    @property
    def buys(self) -> float:
        """Seconds the cap buys at the rate."""
        return float(self.cap / self.rate * 3600)


def draw(rng: random.Random, n: int, thunder_rate: Decimal) -> Run:
    provider = rng.choice(list(GPU))
    rate = thunder_rate if provider == "thunder" else Decimal(rng.randint(400, 4000)) / 100
    cap = cap_buying(rate, provider, spare=rng.uniform(0.5, 4.0))
    run = Run(n, provider, rate, cap, boot_delay=round(rng.uniform(0.0, 2.0), 2), kind="", sleep=0.0)
    # Where the job has to stop: it keeps back the teardown, the sync-up time (at least 1 s) and 2 s more.
    stop_at = run.buys - TEARDOWN[provider] - 3.0
    run.kind = rng.choices(["short", "near", "over"], weights=[3, 4, 3])[0]
    run.sleep = {"short": rng.uniform(0.1, 1.0), "near": stop_at * rng.uniform(0.7, 1.3),
                 "over": run.buys * rng.uniform(1.0, 1.4)}[run.kind]
    return run


def price(markets: Markets, run: Run) -> None:
    """Put the run's rate and boot delay on its fake, just before its create call (Thunder's rate is drawn once:
    its status calls price an instance from the current table)."""
    markets.all[run.provider].switches.boot_delay = run.boot_delay
    if run.provider != "thunder":
        run.offer = set_rate(markets, run.provider, run.rate)


def start(markets: Markets, run: Run) -> None:
    """Submit the run and wait for its create call, so the next run's price and boot delay are not its own."""
    price(markets, run)
    machines = markets.all[run.provider].machines.all
    before = len(machines)
    spec = JobSpec(cell=CELL.format(sleep=run.sleep), provider=run.provider, gpu_model=GPU[run.provider],
                   max_cost_usd=run.cap, offer=run.offer, name=f"run{run.n}")
    job = run.job = burst.submit(spec, namespace={})
    wait_until(lambda: len(machines) > before or job.done(), f"run {run.n}'s create call", limit=60)


def instance_key(run: Run) -> str:
    assert run.job is not None
    (instance_id,) = {e.instance_id for e in run.job.events if e.type is EventType.PROVISIONED}
    return f"{run.provider}:{instance_id}"


def test_fifty_random_runs_near_the_cap_never_bill_above_it(markets: Markets, fault_ledger: FaultLedger,
                                                           burst_home: Path) -> None:
    print(f"seed {SEED} (replay: BURST_FAULT_SEED={SEED})")
    rng = random.Random(SEED)
    thunder_rate = Decimal(rng.randint(1000, 4000)) / 100
    markets.thunder.pricing[THUNDER_SPEC] = float(thunder_rate)
    # Every search asks the fake again (each run has its own price), and status polls come every half second.
    markets.config.write_text("offer-ttl-seconds = 0.0\n" + markets.config.read_text())
    session = Session.current()
    for name in GPU:
        session.provider(ProviderConfig(name=name)).poll_seconds = 0.5
    runs = [draw(rng, n, thunder_rate) for n in range(RUNS)]

    waiting, active = list(runs), []
    deadline = time.monotonic() + 200
    while waiting or active:
        assert time.monotonic() < deadline, f"seed {SEED}: runs still going: " + "; ".join(
            f"{r} at {[e.type.value for e in r.job.events][-4:] if r.job else None}" for r in active)
        active = [r for r in active if r.job is not None and not r.job.done()]
        if waiting and len(active) < AT_ONCE:
            run = waiting.pop(0)
            start(markets, run)
            active.append(run)
        else:
            time.sleep(0.1)

    caps: dict[str, Decimal] = {}
    problems, late = [], []
    results = {}
    for run in runs:
        assert run.job is not None
        result = results[run.n] = run.job.result(0)
        said = output_lines(run.job)
        if result.status not in (JobStatus.COMPLETED, JobStatus.BUDGET_KILLED):
            problems.append(f"{run}: {result.status.value}: {result.error}")
            continue
        if run.kind == "over" and result.status is not JobStatus.BUDGET_KILLED:
            problems.append(f"{run}: slept past what the cap buys, yet ended {result.status.value}")
        if result.status is JobStatus.COMPLETED and ("stdout", "done") not in said:
            problems.append(f"{run}: completed but printed {said!r}")
        if result.status is JobStatus.BUDGET_KILLED and ("stdout", "done") in said:
            late.append(run)  # printed its last line, then the stop at the cap reached it before it exited
        caps[instance_key(run)] = run.cap
        billed = markets.all[run.provider].bills()[instance_key(run).split(":", 1)[1]]
        ledger = sum((r.actual_usd for r in ledger_rows(burst_home) if r.job_id == run.job.id), Decimal(0))
        if not billed <= ledger <= run.cap:
            problems.append(f"{run}: billed {billed} by the provider, {ledger} in the ledger, cap {run.cap}")
    statuses = [r.status for r in results.values()]
    killed = statuses.count(JobStatus.BUDGET_KILLED)
    print(f"seed {SEED}: {statuses.count(JobStatus.COMPLETED)} completed, {killed} budget_killed")
    assert problems == [], f"seed {SEED}:\n" + "\n".join(problems)
    assert JobStatus.COMPLETED in statuses and killed, f"seed {SEED}: the draw never tested both outcomes"
    assert open_reservations(burst_home) == []
    fault_ledger.check_clouds("11 random runs near the cap", markets, caps, faults=killed, trials=RUNS)
    # A cell stopped between its last print and its exit is budget_killed, rightly; one whose exit record came first
    # is completed (the test below makes that race by cause and effect).
    print(f"seed {SEED}: {len(late)} run(s) stopped at the cap after printing their last line")


def test_a_cell_that_ended_before_its_cap_stop_reports_completed(markets: Markets, fault_ledger: FaultLedger,
                                                                tmp_path: Path, burst_home: Path) -> None:
    """The race the random runs hit now and then, made by cause and effect: the cell ends on its own while the
    client, which has not heard so yet, decides to stop the job at its cap.

    The connection's sshd processes (and the agent's front under them) are frozen with SIGSTOP; the cell, detached
    from them, is let go and ends (its exit record says rc 0, reason ok); the client, hearing nothing, sends its
    stop at the cap; then the connection is thawed and the client reads the end of the cell."""
    gate = tmp_path / "gate"
    rate = Decimal(36)
    offer = markets.vast.add_offer(dph_total=float(rate), dph_base=float(rate))
    cap = cap_buying(rate, "vast", spare=1.0)
    body = f"""
import os, time
print("ready", flush=True)
while not os.path.exists({str(gate)!r}):
    time.sleep(0.02)
print("done", flush=True)
"""
    job = burst.submit(JobSpec(cell=body, provider="vast", gpu_model="RTX_4090", max_cost_usd=cap,
                               offer=f"vast:{offer['id']}"), namespace={})
    wait_until(lambda: ("stdout", "ready") in output_lines(job), "the cell to start", limit=60)
    (machine,) = markets.vast.machines.all
    assert machine.server is not None
    frozen = descendants(connection_pids(machine.server))
    assert frozen
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        gate.touch()
        exit_file = machine.home / ".cache/burst/jobs" / job.id / "exit.json"
        wait_until(exit_file.exists, "the cell to end", limit=30)
        ended = json.loads(exit_file.read_text())
        assert (ended["rc"], ended["reason"]) == (0, "ok")
        wait_until(lambda: any(e.type is EventType.STOPPING for e in job.events), "the stop at the cap", limit=60)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    result = job.wait(60)
    assert ("stdout", "done") in output_lines(job)
    fault_ledger.check_clouds("11 cap stop racing the cell's end", markets, cap, faults=1)
    assert result.status is JobStatus.COMPLETED, result.error
