"""Fault cases 2 and 3: the kernel goes away while a marketplace job runs (graceful shutdown, SIGTERM, restart).

A real ipykernel (tests/kernels.py) whose environment points at the provider fakes (``markets`` sets VAST_URL,
VAST_API_KEY and BURST_CONFIG before the kernel starts) runs a cell on a fake Vast instance, a real sshd. The cell
writes one file per step into an rw mount. Then the kernel is shut down, sent SIGTERM, or restarted: its exit hooks
hand the job to the detached reaper (or, for a blocking cell, the interrupt cancels it in the cell), which stops
the cell, brings the files back, destroys the instance and settles the ledger. The case ends when the fake has
nothing running and the mount holds every file the cell reported.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import live_instances, state_row
from fault_figures import FaultLedger
from kernels import Kernel, kill_processes_mentioning, wait_until_clean
from kernels import start_writer as start_writing
from marketplaces import Markets

pytestmark = [pytest.mark.kernel, pytest.mark.ssh, pytest.mark.timeout(150)]

CAP = Decimal(1)
CELL = f"%%burst --provider vast --gpu RTX_4090 --max-cost {CAP} --mount ./out:out:rw"


@pytest.fixture
def kernel(markets: Markets, tmp_path: Path, burst_home: Path, work: Path) -> Iterator[Kernel]:
    """A kernel started after ``markets`` set the fakes' variables, so it (and its reaper) rents from them."""
    started = Kernel(tmp_path, burst_home=burst_home, cwd=work)
    try:
        started.run_ok("%load_ext burst_jupyter")
        yield started
    finally:
        started.close()
        for owned in live_instances(burst_home):  # only what a failed test left: its reaper names its job ids
            kill_processes_mentioning(owned.job_id)


def start_writer(kernel: Kernel, burst_home: Path, *, background: bool) -> tuple[str, int]:
    """The file-writing job on a fake Vast instance, ending by itself after ~30 s if nobody stops it."""
    return start_writing(kernel, burst_home, CELL, steps=300, background=background)


def check_synced_and_gone(case: str, markets: Markets, fault_ledger: FaultLedger, burst_home: Path, work: Path,
                          job_id: str, written: int, *, message: str | None) -> None:
    """The fake has nothing running, the ledger has the job (cancelled), and every reported file came home."""
    fault_ledger.check_clouds(case, markets, CAP, faults=1)
    found = wait_until_clean(burst_home, job_id, timeout=60)
    assert found.ledger is not None and found.ledger.status == "cancelled"
    assert found.ledger.provider == "vast" and Decimal(0) < found.ledger.actual_usd <= CAP
    if message is not None:
        assert message in (found.ledger.message or "")
    for i in range(written):
        assert (work / "out" / f"f{i}.txt").read_text() == str(i)
    assert (work / "out" / "stopped.txt").read_text() == "KeyboardInterrupt"


@pytest.mark.parametrize("background", [True, False], ids=["background", "blocking"])
@pytest.mark.parametrize("how", ["graceful", "sigterm"])
def test_the_kernel_going_away_mid_job_syncs_back_and_ends_the_instance(
        how: str, background: bool, kernel: Kernel, markets: Markets, fault_ledger: FaultLedger, burst_home: Path,
        work: Path) -> None:
    job_id, written = start_writer(kernel, burst_home, background=background)
    if how == "graceful":
        # jupyter_client's graceful path: SIGINT, shutdown_request, SIGTERM after a while, then SIGKILL.
        kernel.km.shutdown_kernel(now=False)
        # A background job is the reaper's (atexit hands it over); a blocking one is cancelled in the cell by the
        # SIGINT, or handed over by the SIGTERM if that were too slow.
        message = "kernel exit; finished by the reaper" if background else None
    else:
        kernel.km.signal_kernel(signal.SIGTERM)
        message = "signal SIGTERM; finished by the reaper"
    kernel.wait_dead()
    check_synced_and_gone("2 kernel shutdown / SIGTERM", markets, fault_ledger, burst_home, work, job_id, written,
                          message=message)


def test_a_kernel_restart_while_a_background_job_runs_syncs_back_and_ends_the_instance(
        kernel: Kernel, markets: Markets, fault_ledger: FaultLedger, burst_home: Path, work: Path) -> None:
    job_id, written = start_writer(kernel, burst_home, background=True)
    kernel.km.restart_kernel(now=False)  # shutdown_request(restart=True), then a new kernel on the same ports
    check_synced_and_gone("3 kernel restart", markets, fault_ledger, burst_home, work, job_id, written,
                          message="kernel exit; finished by the reaper")
    assert state_row(burst_home, job_id).state == "terminated"  # type: ignore[union-attr]
    # The new kernel finds nothing left to clean up.
    kernel.run_ok("%load_ext burst_jupyter")
    assert kernel.run_ok("import burst_jupyter as burst\nprint(burst.orphans())").text("stdout") == "[]\n"
