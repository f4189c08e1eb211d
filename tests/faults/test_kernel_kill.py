"""Fault case 1: kill -9 of the kernel while marketplace jobs run.

A real ipykernel (tests/kernels.py) whose environment points at the provider fakes starts two background jobs, one
on a fake Vast instance and one on a fake RunPod pod (real sshd machines), then dies by SIGKILL: no exit hook
runs, no reaper starts, nothing is synced. What is left is the agent on each instance: nobody renews its lease,
so after ``--lease`` seconds it stops the cell and ends its own instance with the key the provider injected into
it (Vast's CONTAINER_API_KEY, RunPod's pod-scoped RUNPOD_API_KEY), never the account key. Reconciliation
(``burst.cleanup()``) then settles the books of the dead kernel's jobs. With a cap smaller than the lease buys,
the agent ends its instance when the job's money runs out instead (issue 9).
"""

from __future__ import annotations

import os
import signal
from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import ledger_rows, live_instances
from fault_figures import FaultLedger
from kernels import Kernel, wait_for
from marketplaces import Markets, cap_buying, set_rate

import burst_jupyter as burst

pytestmark = [pytest.mark.kernel, pytest.mark.ssh, pytest.mark.timeout(150)]

CAP = Decimal(1)
LEASE = 3
SLACK = 45.0  # on top of the lease: what a loaded 2-core machine may add (only turns a hang into a failure)
CELL = "import time\nprint('running', flush=True)\ntime.sleep(300)\n"


def test_kill_9_of_the_kernel_leaves_each_agent_to_end_its_own_instance(
        markets: Markets, fault_ledger: FaultLedger, tmp_path: Path, burst_home: Path) -> None:
    kernel = Kernel(tmp_path, burst_home=burst_home, cwd=tmp_path)
    try:
        kernel.run_ok("%load_ext burst_jupyter")
        for provider in ("vast", "runpod"):
            cell = kernel.run_ok(f"%%burst --provider {provider} --gpu RTX_4090 --max-cost {CAP} --lease {LEASE} "
                                 f"--background\n{CELL}")
            kernel.pump_until(lambda cell=cell: "running" in cell.text("stdout"), timeout=90,
                              what=f"the {provider} job's cell to run")
        assert kernel.km.provisioner is not None
        os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        kernel.wait_dead()
    finally:
        kernel.close()
    fault_ledger.check_clouds("1 kernel kill -9", markets, CAP, faults=1, timeout=LEASE + SLACK)
    (vast,) = markets.vast.instances.values()
    (pod_id,) = markets.runpod.pods
    assert (vast.destroyed_by, markets.runpod.terminated_by(pod_id)) == ("scoped", "scoped")
    wait_for(lambda: markets.processes() == [], timeout=SLACK, what="every process on the machines to end")
    # The dead kernel's rows are stranded: reconciliation finds both instances gone and settles them.
    jobs = {o.job_id for o in live_instances(burst_home)}
    assert len(jobs) == 2
    burst.cleanup()
    assert live_instances(burst_home) == []
    assert {r.job_id for r in ledger_rows(burst_home)} == jobs


def test_after_a_kill_9_each_agent_ends_its_instance_when_the_money_runs_out(
        markets: Markets, fault_ledger: FaultLedger, tmp_path: Path, burst_home: Path) -> None:
    """The same kill -9, with the default 10-minute lease and a cap that buys well under a minute: nobody is left to
    watch, and each agent stops its cell and ends its own instance when the job's money runs out (the manifest's
    rate and cap, keeping back what the end takes), long before the lease would lapse."""
    rate, trials, caps = Decimal(36), 2, {}
    # Every search asks the fakes again: each Vast job rents an offer of its own at the test's rate.
    markets.config.write_text("offer-ttl-seconds = 0.0\n" + markets.config.read_text())
    kernel = Kernel(tmp_path, burst_home=burst_home, cwd=tmp_path)
    try:
        kernel.run_ok("%load_ext burst_jupyter")
        for provider in ("vast", "runpod"):
            # Buys the least a job may be given and 15 s more: the kernel dies before any budget stop is due.
            cap = cap_buying(rate, provider, spare=15)
            for _ in range(trials):
                offer = set_rate(markets, provider, rate)
                cell = kernel.run_ok(f"%%burst --provider {provider} --gpu RTX_4090 --max-cost {cap} --background"
                                     + (f" --offer {offer}" if offer else "") + f"\n{CELL}")
                kernel.pump_until(lambda cell=cell: "running" in cell.text("stdout"), timeout=90,
                                  what=f"the {provider} job's cell to run")
            caps[provider] = cap
        assert kernel.km.provisioner is not None
        os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        kernel.wait_dead()
    finally:
        kernel.close()
    by_instance = {**{f"vast:{i}": caps["vast"] for i in markets.vast.instances},
                   **{f"runpod:{p}": caps["runpod"] for p in markets.runpod.pods}}
    fault_ledger.check_clouds("1 kernel kill -9, cap before lease", markets, by_instance, faults=2 * trials,
                              trials=2 * trials, timeout=SLACK)
    assert {v.destroyed_by for v in markets.vast.instances.values()} == {"scoped"}
    assert {markets.runpod.terminated_by(p) for p in markets.runpod.pods} == {"scoped"}
    wait_for(lambda: markets.processes() == [], timeout=SLACK, what="every process on the machines to end")
