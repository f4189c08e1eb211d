"""Fault case 7: the SSH connection to a rented instance drops mid-stream, three times in one job.

The instance is a provider fake's machine (a real sshd, tests/fakes/base.py). Each cut SIGKILLs the sshd processes
serving the job's connection (``kill_connections``, as a crashed host or a reset NAT does); the cell, detached from
the connection, runs on. Every cut is made once the client has seen the cell reach a line, and the cell then
waits on a gate file that the test creates only after the client has noticed the cut and re-attached, so each cut
lands mid-stream by cause and effect, never by timing. The job must finish with every line exactly once, in
order, and its rw results home; the case ends by checking the fakes.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import gated_lines_cell, ledger_rows, wait_until
from fault_figures import FaultLedger
from marketplaces import Markets
from ssh_boxes import count, output_lines
from sshd import kill_connections

import burst_jupyter as burst
from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus
from burst_jupyter.spec import JobSpec

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

CAP = Decimal(1)
GPU = {"vast": "RTX_4090", "runpod": "RTX_4090", "thunder": "H100", "lambda": "H100"}
LINES = 45
CUTS = (8, 20, 33)  # the lines after which the connection is cut


@pytest.mark.parametrize("provider", list(GPU))
def test_ssh_drops_mid_stream_lose_and_double_no_output(provider: str, markets: Markets, fault_ledger: FaultLedger,
                                                        tmp_path: Path, burst_home: Path) -> None:
    gates = {at: str(tmp_path / f"gate{at}") for at in CUTS}
    (tmp_path / "out").mkdir()
    body = gated_lines_cell(LINES, gates, pause=0.02)
    job = burst.submit(JobSpec(cell=body, provider=provider, gpu_model=GPU[provider], max_cost_usd=CAP,
                               mount_local=["./out:out:rw"], name="drops"), namespace={})
    cloud = markets.all[provider]
    for n, at in enumerate(CUTS, 1):
        wait_until(lambda at=at: ("stdout" if at % 3 != 2 else "stderr", f"line {at}") in output_lines(job),
                   f"line {at}", limit=60)
        (machine,) = cloud.machines.all
        assert machine.server is not None and kill_connections(machine.server) >= 1
        wait_until(lambda n=n: count(job, EventType.RECONNECTING) >= n, f"reconnect {n}", limit=60)
        Path(gates[at]).touch()
    result = job.wait(90)
    assert result.status is JobStatus.COMPLETED, result.error
    lines = [(s, text) for s, text in output_lines(job) if not text.startswith("burst: ")]
    assert lines == [("stderr" if i % 3 == 2 else "stdout", f"line {i}") for i in range(LINES)]
    assert count(job, EventType.RECONNECTING) == len(CUTS)
    assert (tmp_path / "out" / "done.txt").read_text() == f"all {LINES} lines"
    (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job.id]
    assert (row.provider, row.status) == (provider, "completed")
    fault_ledger.check_clouds("7 SSH drops mid-stream", markets, CAP, faults=len(CUTS))
