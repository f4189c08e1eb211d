"""Fault case 1: kill -9 of the kernel while marketplace jobs run.

A real ipykernel (tests/kernels.py) whose environment points at the provider fakes starts two background jobs, one
on a fake Vast instance and one on a fake RunPod pod (real sshd machines), then dies by SIGKILL: no exit hook
runs, no reaper starts, nothing is synced. What is left is the agent on each instance: nobody renews its lease,
so after ``--lease`` seconds it stops the cell and ends its own instance with the key the provider injected into
it (Vast's CONTAINER_API_KEY, RunPod's pod-scoped RUNPOD_API_KEY), never the account key. Reconciliation
(``burst.cleanup()``) then settles the books of the dead kernel's jobs.
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
from marketplaces import Markets

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
