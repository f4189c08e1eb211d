"""Fault case 19: an output flood. The cell prints far more than the notebook may show, then one line with no
newline as long again, then writes its result. The notebook gets a bounded head and tail with a line saying what
was left out; the job still syncs back, ends and settles within its cap, on this machine and on the marketplace
fakes (real sshd instances), trial after trial.

The limits are the real options, lowered so a few MB make the point (tests/test_output_flood.py measures a
kernel's memory under a larger flood).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, ledger_rows, local_jobdirs, open_reservations, run_cell
from fault_figures import FaultLedger
from marketplaces import GPU, Markets

from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(150)]

CASE = "19 output flood"
TRIALS = 2
CAP = Decimal(1)
NOTEBOOK_CHARS = 50_000
FLOOD = """
    import sys
    for i in range(4096):
        print(f"line {i:05d} " + "." * 1000)
    sys.stdout.write("y" * (4 << 20))
    print()
    open("out/after.txt", "w").write("trial %d")
    print("the last words")
"""


def _trial(ip: Any, tmp_path: Path, options: str, trial: int) -> tuple[Any, int]:
    """One flooded job; returns its result and how many of the user's files it lost (0 or 1)."""
    (tmp_path / "out").mkdir(exist_ok=True)
    result, streams = run_cell(ip, cell(f"{options} --max-cost {CAP} --mount ./out:out:rw --background",
                                        FLOOD % trial))
    assert result.error_in_exec is None, streams.text(ours=True)
    job = result.result
    done = job.wait(timeout=120)
    assert done.status is JobStatus.COMPLETED, done.error
    shown = "".join(e.text or "" for e in job.events if e.type is EventType.OUTPUT)
    assert len(shown) < 2 * NOTEBOOK_CHARS and "characters of output left out here" in shown
    assert shown.startswith("line 00000") and shown.rstrip().endswith("the last words")
    after = tmp_path / "out" / "after.txt"
    return done, int(not after.exists() or after.read_text() != f"trial {trial}")


@pytest.fixture(autouse=True)
def _limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURST_NOTEBOOK_OUTPUT_CHARS", str(NOTEBOOK_CHARS))
    monkeypatch.setenv("BURST_LOG_BYTES", str(1 << 20))


def test_a_flood_on_this_machine(ip: Any, tmp_path: Path, burst_home: Path, fault_ledger: FaultLedger) -> None:
    lost, worst = 0, Decimal(0)
    for trial in range(TRIALS):
        done, gone = _trial(ip, tmp_path, "--provider local --rate 36", trial)
        lost += gone
        (row,) = [r for r in ledger_rows(burst_home) if r.job_id == done.job_id]
        assert row.actual_usd is not None
        worst = max(worst, row.actual_usd / CAP)
    leaked = len(local_jobdirs(burst_home))
    fault_ledger.record(CASE, trials=TRIALS, faults=TRIALS, leaked=leaked, worst=worst, lost=lost)
    assert (leaked, lost, open_reservations(burst_home)) == (0, 0, [])


@pytest.mark.parametrize("provider", ["vast", "runpod", "thunder", "lambda"])
def test_a_flood_on_a_marketplace(ip: Any, markets: Markets, tmp_path: Path, burst_home: Path, provider: str,
                                  fault_ledger: FaultLedger) -> None:
    lost = 0
    for trial in range(TRIALS):
        lost += _trial(ip, tmp_path, f"--provider {provider} --gpu {GPU[provider]}", trial)[1]
    assert open_reservations(burst_home) == []
    fault_ledger.check_clouds(CASE, markets, CAP, faults=TRIALS, trials=TRIALS, lost=lost)
