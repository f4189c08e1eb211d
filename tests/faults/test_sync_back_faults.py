"""Fault cases 17 and 18: this machine fails during sync-back, not the instance.

17, disk full: the rw mount is a real 1 MB tmpfs, and the cell writes a 2 MB result beside two small ones. The
small ones land, the big one cannot: that is a local write error, not a broken connection, so there is no
refetch storm. The instance is kept with its results and asked again every few seconds; once space is freed
(the tmpfs grows) the job completes with every file whole. Left full, the cap ends the wait, and the job view
and the ledger row name exactly the file that did not come back.

The reaper keeps such an instance too: a kernel that goes away while the disk is full hands the job to a reaper
that asks again until space is freed (within the cap), and brings every file home.

18, reaper killed mid-sync: ``burst.shutdown()`` hands a job to a detached reaper, which is killed (-9) while it
writes a result (the job also changed a file the user edited meanwhile). The kernel that handed the job over is
still alive (this test process), and ``burst.cleanup()`` finishes the job anyway: the results land whole, the
user's edit stays with the instance's version beside it, nothing temporary is left in the user's folder, the
instance is gone and billed within its cap.

Both count the user's own files (one edited locally while the job ran) that were lost or replaced: none may be.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, ledger_rows, run_cell, state_row, wait_until, write
from fault_figures import FaultLedger
from marketplaces import GPU, Markets, set_rate

import burst_jupyter as burst
from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(150)]

RATE = Decimal("72")  # $/h: 2 cents a second, so a small cap runs out within seconds
USER_FILE = "mine.txt"

FULL_DISK_CELL = """
    import os
    open("out/a.txt", "w").write("a")
    open("out/big.bin", "wb").write(os.urandom(2_000_000))
    open("out/z.txt", "w").write("z")
    print("written", flush=True)
"""


def offer(markets: Markets, provider: str) -> str:
    """Options renting ``provider`` at RATE."""
    rented = set_rate(markets, provider, RATE)
    return f"--provider {provider} --gpu {GPU[provider]}" + (f" --offer {rented}" if rented else "")


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """``folder`` as a tmpfs of ``size``: a real full disk, no patching. Needs root (or CAP_SYS_ADMIN)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def stderr_of(job: Any) -> str:
    return "".join(e.text or "" for e in job.events if e.type is EventType.OUTPUT and e.stream == "stderr")


def lost_user_files(out: Path, expected: dict[str, str]) -> int:
    return sum(1 for name, text in expected.items() if not (out / name).is_file() or (out / name).read_text() != text)


@pytest.mark.parametrize("provider", ["vast", "runpod", "thunder", "lambda"])
def test_17_disk_full_keeps_the_instance_until_space_is_freed(ip: Any, markets: Markets, tmp_path: Path,
                                                              burst_home: Path, provider: str,
                                                              fault_ledger: FaultLedger) -> None:
    with small_disk(tmp_path / "out", "1M") as out:
        write(out / USER_FILE, "the user's")
        options = f"{offer(markets, provider)} --max-cost 1 --mount ./out:out:rw --background"
        result, _ = run_cell(ip, cell(options, FULL_DISK_CELL))
        job = result.result
        wait_until(lambda: "not brought back: out/big.bin" in stderr_of(job), "the full disk reported", limit=90)
        assert not job.done()  # kept, with its results
        write(out / USER_FILE, "the user's, edited meanwhile")
        subprocess.run(["mount", "-o", "remount,size=8M", str(out)], check=True)  # space is freed
        done = job.wait(timeout=60)

        assert done.status is JobStatus.COMPLETED, done.error
        assert (out / "a.txt").read_text() == "a" and (out / "z.txt").read_text() == "z"
        assert (out / "big.bin").stat().st_size == 2_000_000
        assert "could not be written here: No space left on device" in stderr_of(job)
        assert not any(e.type is EventType.RECONNECTING for e in job.events)  # a local error is no dropped link
        assert not (out / ".burst-tmp").exists()
        lost = lost_user_files(out, {USER_FILE: "the user's, edited meanwhile"})
    fault_ledger.check_clouds("17 disk full during sync-back", markets, Decimal(1), faults=1, lost=lost)
    assert lost == 0


def test_17_disk_left_full_ends_at_the_cap_naming_what_did_not_come_back(ip: Any, markets: Markets, tmp_path: Path,
                                                                          burst_home: Path,
                                                                          fault_ledger: FaultLedger) -> None:
    cap = Decimal("0.4")  # 20 s at $72/h
    with small_disk(tmp_path / "out", "1M") as out:
        write(out / USER_FILE, "the user's")
        result, _ = run_cell(ip, cell(f"{offer(markets, 'vast')} --max-cost {cap} --mount ./out:out:rw --background",
                                      FULL_DISK_CELL))
        job = result.result
        done = job.wait(timeout=90)

        assert done.status is JobStatus.BUDGET_KILLED
        assert "not brought back: out/big.bin (could not be written here: No space left on device)" in str(done.error)
        assert (out / "a.txt").read_text() == "a" and (out / "z.txt").read_text() == "z"
        (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job.id]
        assert row.status == "budget_killed" and "not brought back: out/big.bin" in (row.message or "")
        assert row.actual_usd is not None and row.actual_usd <= cap
        lost = lost_user_files(out, {USER_FILE: "the user's"})
    fault_ledger.check_clouds("17 disk full during sync-back", markets, cap, faults=1, lost=lost)
    assert lost == 0


def reaper_logs(burst_home: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (burst_home / "logs").glob("reaper-*.log"))


def test_17_a_reaper_finding_the_disk_full_keeps_the_instance_until_space_is_freed(
        ip: Any, markets: Markets, tmp_path: Path, burst_home: Path, fault_ledger: FaultLedger) -> None:
    """The kernel goes away (``burst.shutdown()``) while the job's results wait on a full disk: its reaper keeps
    the instance with them too, asking again every few seconds within the cap, and brings them all home once
    space is freed, instead of ending the instance with the results on it."""
    with small_disk(tmp_path / "out", "1M") as out:
        write(out / USER_FILE, "the user's")
        result, _ = run_cell(ip, cell(f"{offer(markets, 'vast')} --max-cost 1 --mount ./out:out:rw --background",
                                      FULL_DISK_CELL))
        job = result.result
        wait_until(lambda: "not brought back: out/big.bin" in stderr_of(job), "the full disk reported", limit=90)
        (job_id,) = burst.shutdown()
        wait_until(lambda: "kept the instance with results this machine could not write" in reaper_logs(burst_home),
                   "the reaper to find the disk full", limit=60)
        assert state_row(burst_home, job_id).state == "launched" and markets.leftovers()  # kept, with its results
        subprocess.run(["mount", "-o", "remount,size=8M", str(out)], check=True)  # space is freed
        wait_until(lambda: state_row(burst_home, job_id).state == "terminated", "the reaper to finish", limit=60)

        assert (out / "a.txt").read_text() == "a" and (out / "z.txt").read_text() == "z"
        assert (out / "big.bin").stat().st_size == 2_000_000
        assert not (out / ".burst-tmp").exists()
        wait_until(lambda: [r for r in ledger_rows(burst_home) if r.job_id == job_id], "the ledger row")
        (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job_id]
        assert "not brought back" not in (row.message or ""), row.message
        lost = lost_user_files(out, {USER_FILE: "the user's"})
    fault_ledger.check_clouds("17 disk full during sync-back", markets, Decimal(1), faults=1, lost=lost)
    assert lost == 0


REAPED_CELL = """
    import time
    open("out/a.txt", "w").write("a")
    with open("out/big.bin", "wb") as f:
        f.truncate(300_000_000)  # sparse here; 300 MB on the wire and on the user's disk
    open("out/z.txt", "w").write("z")
    open("out/mine.txt", "w").write("the instance's")
    print("written", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("provider", ["vast", "runpod"])
def test_18_reaper_killed_mid_sync_then_cleanup_finishes_the_job(ip: Any, markets: Markets, tmp_path: Path,
                                                                 burst_home: Path, provider: str,
                                                                 fault_ledger: FaultLedger) -> None:
    out = tmp_path / "out"
    write(out / USER_FILE, "the user's")
    result, _ = run_cell(ip, cell(f"{offer(markets, provider)} --max-cost 2 --mount ./out:out:rw --background",
                                  REAPED_CELL))
    job = result.result
    wait_until(lambda: any("written" in (e.text or "") for e in job.events if e.type is EventType.OUTPUT), "written")
    write(out / USER_FILE, "the user's, edited meanwhile")
    (job_id,) = burst.shutdown()
    reaper = state_row(burst_home, job_id).reaper_pid
    assert reaper is not None
    wait_until(lambda: any(p.name.endswith(".burst-tmp") for p in out.rglob("*")), "the reaper mid-sync",
               limit=90)
    os.kill(reaper, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{reaper}").exists(), "the reaper gone")
    assert state_row(burst_home, job_id).state == "launched"  # unfinished: the kernel (this process) lives on

    report = burst.cleanup()

    assert [f.job_id for f in report.findings if f.ended] == [job_id], report
    assert state_row(burst_home, job_id).state == "terminated"
    assert (out / "a.txt").read_text() == "a" and (out / "z.txt").read_text() == "z"
    assert (out / "big.bin").stat().st_size == 300_000_000
    assert [p for p in out.rglob("*") if "burst-tmp" in p.name] == []
    # The upload's record reached the reaper with the job: the user's edit stays, the instance's version beside it.
    assert (out / f"mine.burst-conflict-{job_id}.txt").read_text() == "the instance's"
    (row,) = [r for r in ledger_rows(burst_home) if r.job_id == job_id]
    assert row.actual_usd is not None and row.actual_usd <= Decimal(2)
    lost = lost_user_files(out, {USER_FILE: "the user's, edited meanwhile"})
    fault_ledger.check_clouds("18 reaper killed mid-sync", markets, Decimal(2), faults=1, lost=lost)
    assert lost == 0
