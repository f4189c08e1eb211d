"""Sync failure: the instance is unreachable while its results are not yet back. The client keeps it and keeps
trying; results that come back late are whole. Only the cap ends the wait, and then the job view and the ledger
row say exactly what was never brought back.

The outage is real: the machine's sshd listener is frozen (SIGSTOP) and its live connections are cut, so new
connections hang and the instance still shows "running" at the provider (no preemption).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, ledger_rows, run_cell, wait_until
from fault_figures import FaultLedger
from marketplaces import Markets
from sshd import kill_connections

from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

# A pricey machine, so a small cap runs out within seconds: $72/h is 2 cents a second.
RATE = Decimal("72")
CELL = """
    import time
    print("ready", flush=True)
    time.sleep(1.5)
    open("out/result.txt", "w").write("precious")
    print("written", flush=True)
"""


def _outage(markets: Markets, job: Any) -> Any:
    """Freeze the instance's sshd and cut its connections; returns the listener to thaw."""
    instance_id = next(e.instance_id for e in job.events if e.type is EventType.PROVISIONED)
    server = markets.vast.instance(int(instance_id)).machine.server
    os.kill(server.pid, signal.SIGSTOP)
    kill_connections(server)
    return server


def _thaw(server: Any) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGCONT)


def _start(ip: Any, markets: Markets, tmp_path: Path, max_cost: str) -> Any:
    offer = markets.vast.add_offer(gpu_name="RTX 4090", dph_total=float(RATE), dph_base=float(RATE))
    (tmp_path / "out").mkdir()
    options = f"--gpu RTX_4090 --offer vast:{offer['id']} --max-cost {max_cost} --mount ./out:out:rw --background"
    result, _ = run_cell(ip, cell(options, CELL))
    job = result.result
    wait_until(lambda: any("ready" in (e.text or "") for e in job.events if e.type is EventType.OUTPUT), "ready")
    return job


def test_results_that_come_back_late_are_whole(ip: Any, markets: Markets, tmp_path: Path,
                                               fault_ledger: FaultLedger) -> None:
    job = _start(ip, markets, tmp_path, "1")
    server = _outage(markets, job)
    thaw = threading.Timer(4.0, _thaw, args=(server,))  # the cell ends meanwhile; its results wait on the instance
    thaw.start()
    try:
        done = job.wait(timeout=90)
    finally:
        thaw.cancel()
        _thaw(server)
    assert done.status is JobStatus.COMPLETED, done.error
    assert any(e.type is EventType.RECONNECTING for e in job.events)
    assert (tmp_path / "out" / "result.txt").read_text() == "precious"
    assert done.total_cost_usd is not None and done.total_cost_usd <= Decimal(1)
    fault_ledger.check_clouds("sync: results late", markets, Decimal(1), faults=1)


def test_at_the_cap_the_job_ends_and_says_what_was_lost(ip: Any, markets: Markets, tmp_path: Path,
                                                         burst_home: Path, fault_ledger: FaultLedger) -> None:
    job = _start(ip, markets, tmp_path, "0.4")  # 20 s at $72/h
    server = _outage(markets, job)
    try:
        done = job.wait(timeout=90)
    finally:
        _thaw(server)
    assert done.status is JobStatus.BUDGET_KILLED
    assert "not brought back: changes in out (rw mount of out)" in str(done.error)
    assert not (tmp_path / "out" / "result.txt").exists()
    final = job.events[-1]
    assert final.type is EventType.BUDGET_KILLED and "not brought back" in (final.error or "")
    (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job.id]
    assert row.status == "budget_killed" and "not brought back: changes in out" in (row.message or "")
    assert row.actual_usd is not None and row.actual_usd <= Decimal("0.4")
    fault_ledger.check_clouds("sync: results lost at the cap", markets, Decimal("0.4"), faults=1)
