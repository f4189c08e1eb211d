"""Fault cases 15 and 16: kill -9 of the kernel while its marketplace instances are being created, or booting.

A real ipykernel (tests/kernels.py) starts background jobs on the Vast and RunPod fakes and dies by SIGKILL either
while the create calls are still unanswered (the fakes made the instances and hold the replies: the state rows
have no instance id) or while the instances boot (their status stays null/loading: no agent ever starts). Nobody
runs cleanup. What ends each instance is the boot watchdog its create request armed (Vast ``onstart``, RunPod
``dockerArgs``), which the fakes run on their sshd machines the way the providers do, in the instance's environment:
once no client has taken the job over for the lease (plus the provider's poll interval and a first-contact slack),
it ends the instance with the key the provider injected for that instance alone (the fakes record
``destroyed_by``/``terminated_by``). Then ``burst.cleanup()`` bills each at the rate recorded with the intent,
never $0, on a ledger row that the daily and weekly caps count.
"""

from __future__ import annotations

import os
import signal
from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import db_file, ledger_rows, live_instances
from fault_figures import FaultLedger
from kernels import Kernel, wait_for
from marketplaces import Markets

import burst_jupyter as burst
from burst_jupyter.budget import Budget
from burst_jupyter.providers._boot_watchdog import FIRST_CONTACT_SLACK
from burst_jupyter.providers.base import REMOTE_JOB_ROOT

pytestmark = [pytest.mark.kernel, pytest.mark.ssh, pytest.mark.timeout(180)]

CAP = Decimal(1)
LEASE = 3
POLL = 10.0  # Vast's poll interval (the longer of the two): the watchdog allows it on top of the lease
BOOT = 6.0  # seconds the instances of the boot case stay null/loading
SLACK = 45.0  # what a loaded 2-core machine may add (only turns a hang into a failure)
JOBS = ("vast", "vast", "runpod", "runpod")  # two jobs on each marketplace, all caught by the one kill
CELL = "print('must not run')\n"
CASES = {"create": "15 kill -9 during create", "boot": "16 kill -9 during boot"}


def billed_rates(markets: Markets) -> dict[str, Decimal]:
    """The $/h each fake bills, by the job id its instance carries."""
    rates = {}
    for inst in markets.vast.instances.values():
        job = dict(inst.row["extra_env"])["BURST_JOB_ID"]
        rates[job] = Decimal(str(inst.row["dph_total"]))
    for pod in markets.runpod.pods.values():
        job = next(e.split("=", 1)[1] for e in pod["env"] if e.startswith("BURST_JOB_ID="))
        rates[job] = Decimal(str(pod["costPerHr"]))
    return rates


@pytest.mark.parametrize("phase", sorted(CASES))
def test_kill_9_before_any_agent_runs_leaves_each_instance_to_end_itself(
        phase: str, markets: Markets, fault_ledger: FaultLedger, tmp_path: Path, burst_home: Path) -> None:
    for cloud in (markets.vast, markets.runpod):
        if phase == "create":
            cloud.switches.slow_create = 120.0  # the instance is made at once; the reply never reaches the kernel
        else:
            cloud.switches.boot_delay = BOOT
    kernel = Kernel(tmp_path, burst_home=burst_home, cwd=tmp_path)
    try:
        kernel.run_ok("%load_ext burst_jupyter")
        for provider in JOBS:
            kernel.run_ok(f"%%burst --provider {provider} --gpu RTX_4090 --max-cost {CAP} --lease {LEASE} "
                          f"--background\n{CELL}")
        if phase == "create":
            wait_for(lambda: len(markets.vast.instances) == 2 and len(markets.runpod.pods) == 2, timeout=60,
                     what="the fakes to make every instance")
        else:
            wait_for(lambda: sum(o.instance_id is not None for o in live_instances(burst_home)) == len(JOBS),
                     timeout=60, what="every job to record its instance")
        rows = live_instances(burst_home)
        machines = [m for cloud in (markets.vast, markets.runpod) for m in cloud.machines.all]
        # Killed inside the phase: no create answered yet, or no instance booted yet.
        assert len(rows) == len(JOBS)
        if phase == "create":
            assert all(o.state == "intent" and o.instance_id is None for o in rows)
        else:
            assert not any(m.ready for m in machines)
        assert kernel.km.provisioner is not None
        os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        kernel.wait_dead()
    finally:
        kernel.close()
    wait_for(lambda: markets.leftovers() == {}, timeout=BOOT + LEASE + POLL + FIRST_CONTACT_SLACK + SLACK,
             what="every instance to end itself")
    assert {inst.destroyed_by for inst in markets.vast.instances.values()} == {"scoped"}
    assert {markets.runpod.terminated_by(p) for p in markets.runpod.pods} == {"scoped"}
    assert not any((m.home / REMOTE_JOB_ROOT).exists() for m in machines)  # no agent ever ran
    assert ledger_rows(burst_home) == []  # nobody has settled anything: no cleanup ran
    rates = billed_rates(markets)
    assert set(rates) == {o.job_id for o in rows}

    burst.cleanup()
    assert live_instances(burst_home) == []
    settled = {r.job_id: r for r in ledger_rows(burst_home)}
    assert set(settled) == set(rates)
    for job, row in settled.items():
        assert row.rate_usd_per_hour == rates[job], row
        assert row.actual_usd is not None and row.actual_usd > 0, row
    spent = sum((r.actual_usd or Decimal(0) for r in settled.values()), Decimal(0))
    with Budget(db_file(burst_home)) as budget:
        usage = budget.snapshot()
    assert usage.day.spent >= spent and usage.week.spent >= spent
    assert usage.day.reserved == 0  # the dead kernel's reservations became these rows
    fault_ledger.check_clouds(CASES[phase], markets, CAP, faults=len(JOBS), trials=len(JOBS))
