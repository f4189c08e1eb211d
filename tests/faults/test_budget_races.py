"""Fault cases 9, 9b and 10: the budget under concurrent launches and under kill -9.

Case 9: eight ``burst submit`` processes start at once against a daily cap that fits five jobs' reservations.
Exactly five rent an instance and run; the other three fail before renting anything, with one line naming the
cap. Each job's command waits for a gate file (the fake machines are sshd processes on this host, so they see
it), so the five winners still hold their reservations while the losers decide: "at once" does not depend on how
fast a loaded machine starts eight Python processes. Case 9b is the same race against a project's
``daily-budget``, which each process reads and none stores.

Case 10: a process writing the ledger in a tight loop (reserve, then settle / record an attempt and settle /
release) is killed with SIGKILL at random moments. After each kill the file is intact, every row whole, no job is
both settled and still holding money, and new writes go through; a second writer running the whole time never
sees "database is locked".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import db_file, ledger_rows, open_reservations, state_row_count, wait_until
from marketplaces import Markets

from burst_jupyter.budget import Budget, format_usd

# --- case 9 ------------------------------------------------------------------------------------------------

RACERS, FITS = 8, 5
JOB_CAP = Decimal(1)
RACE = {"stored": "9 budget race (8 launch, 5 fit)", "project": "9b budget race, project cap"}


@pytest.mark.ssh
@pytest.mark.timeout(120)
@pytest.mark.parametrize("trial", [1, 2])
@pytest.mark.parametrize("where", ["stored", "project"])
def test_eight_launches_against_a_cap_that_fits_five_run_exactly_five(
    where: str, trial: int, markets: Markets, burst_home: Path, tmp_path: Path, fault_ledger: Any
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    named = ""
    if where == "stored":
        with Budget(db_file(burst_home)) as budget:
            budget.set_cap("day", JOB_CAP * FITS)
    else:
        (project / "pyproject.toml").write_text(f"[tool.burst]\ndaily-budget = {JOB_CAP * FITS}\n")
        named = f" (daily-budget in {project / 'pyproject.toml'} [tool.burst])"
    gate, started = tmp_path / "gate", tmp_path / "started"
    started.mkdir()
    # Runs on the rented (fake) machine: say it started, then hold the instance until the test opens the gate.
    command = f"touch {started}/$$; while [ ! -e {gate} ]; do sleep 0.05; done"
    burst = Path(sys.executable).with_name("burst")
    procs = {
        f"racer-{n}": subprocess.Popen(
            [str(burst), "submit", "--provider", "runpod", "--gpu-model", "RTX_4090", "--max-cost-usd",
             str(JOB_CAP), "--name", f"racer-{n}", "--", "sh", "-c", command],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=project,
        )
        for n in range(RACERS)
    }
    try:
        # Every racer has decided: refused (its process is over) or running on its instance.
        wait_until(lambda: sum(p.poll() is not None for p in procs.values()) + len(list(started.iterdir()))
                   >= RACERS, "every racer ran or was refused", limit=90)
        running = len(list(started.iterdir()))
        gate.touch()
        outputs = {name: proc.communicate(timeout=90) for name, proc in procs.items()}
    finally:
        gate.touch()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    codes = {name: proc.returncode for name, proc in procs.items()}
    winners = sorted(name for name, code in codes.items() if code == 0)
    losers = sorted(name for name, code in codes.items() if code != 0)
    assert (running, len(winners), len(losers)) == (FITS, FITS, RACERS - FITS), (codes, outputs)
    for name in losers:
        out, err = outputs[name]
        said = err.splitlines()  # the CLI's error line; stdout has the job's status lines, as for any job
        assert codes[name] == 1 and len(said) == 1, (name, out, err)
        assert said[0].startswith("burst: job ") and said[0].endswith(
            f" failed: daily budget: $0.00 spent + {format_usd(JOB_CAP * FITS)} reserved + {format_usd(JOB_CAP)}"
            f" for this job > {format_usd(JOB_CAP * FITS)} cap{named}"), said
    # Only the winners rented: one instance each at the fakes, one state row each, one ledger row each.
    created = {name: len(cloud.bills()) for name, cloud in markets.all.items()}
    assert created == {"vast": 0, "runpod": FITS, "thunder": 0, "lambda": 0}
    assert state_row_count(burst_home) == FITS
    rows = ledger_rows(burst_home)
    assert sorted(row.name or "" for row in rows) == winners
    assert all((row.status, row.attempt, row.reserved_usd) == ("completed", 1, JOB_CAP) for row in rows), rows
    assert open_reservations(burst_home) == []
    with Budget(db_file(burst_home)) as budget:  # a project's cap is never stored: other folders know nothing of it
        assert budget.caps()["day"] == (JOB_CAP * FITS if where == "stored" else None)
    fault_ledger.check_clouds(RACE[where], markets, JOB_CAP, faults=RACERS - FITS)


# --- case 10 -----------------------------------------------------------------------------------------------

KILLS = 30
KILL_CASE = "10 kill -9 during ledger writes"
NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)  # one fixed day: the snapshot sees every row
RESERVE = Decimal("1.00")

# argv: db path, job id prefix, "forever" or a stop-file path, the time. Every job reserves RESERVE, then by turns:
# settles (attempt 1); loses attempt 1 (preempted, $0.30) and settles attempt 2 ($0.20); or is released unrun.
# A victim ("forever") writes back to back, so a kill most likely lands inside a transaction. The steady writer
# pauses between jobs as real writers do: SQLite's locks are not fair, and a second back-to-back writer would
# keep the lock nearly all the time and starve the checks past any busy timeout.
_WRITER = textwrap.dedent("""
    import datetime as dt, itertools, os, sys, time
    from decimal import Decimal
    from pathlib import Path
    from burst_jupyter.budget import Budget, format_usd

    path, prefix, until = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    now = dt.datetime.fromisoformat(sys.argv[4])
    budget = Budget(path)
    if until == "forever":
        # A victim pauses a moment before each BEGIN and COMMIT: a kill then lands between two transactions or
        # inside one with all its changes made, far more often than chance timing would place it there.
        budget._conn.set_trace_callback(lambda sql: time.sleep(0.002) if sql.startswith(("BEGIN", "COMMIT")) else None)
    print("ready", flush=True)
    run = dict(provider="runpod", instance_id="i", gpu="RTX_4090", rate_usd_per_hour=Decimal("0.34"),
               started_at=now, ended_at=now)
    for n in itertools.count():
        if until != "forever" and os.path.exists(until):
            print(n, flush=True)
            break
        job = f"{prefix}-{n}"
        budget.reserve(job_id=job, name=None, provider="runpod", gpu="RTX_4090", amount=Decimal("1.00"), now=now)
        if n % 3 == 0:
            budget.settle(job, actual_usd=Decimal("0.25"), status="completed", **run)
        elif n % 3 == 1:
            budget.record_attempt(job, attempt=1, actual_usd=Decimal("0.30"), status="preempted", **run)
            budget.settle(job, attempt=2, actual_usd=Decimal("0.20"), status="completed", **run)
        else:
            budget.release(job)
        if until != "forever":
            time.sleep(0.005)
""")


def _writer(path: Path, prefix: str, until: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), prefix, until, NOW.isoformat()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    return proc


def _check_consistent(path: Path) -> int:
    """Everything case 10 promises of the file after a kill; returns the number of ledger rows."""
    with contextlib.closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as raw:
        # Hold the write lock while looking, so the steady writer cannot add rows between the reads below (it
        # waits, as any writer behind a busy one must, without an error).
        raw.execute("BEGIN IMMEDIATE")
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = raw.execute("SELECT job_id, attempt, rate_usd_per_hour, started_at, ended_at, reserved_usd,"
                             " actual_usd, recorded_at FROM ledger_rows").fetchall()
        with Budget(path) as budget:
            rows, held = budget.rows(), budget.open_reservations()
            snapshot = budget.snapshot(NOW)
        raw.execute("ROLLBACK")
    # Every row whole: each money column parses as a Decimal, each time as an aware datetime.
    for job_id, attempt, *money_and_times in stored:
        rate, started, ended, reserved, actual, recorded = money_and_times
        assert isinstance(job_id, str) and attempt in (1, 2)
        assert all(Decimal(text).is_finite() for text in (rate, reserved, actual))
        assert all(dt.datetime.fromisoformat(text).tzinfo is not None for text in (started, ended, recorded))
    assert len(rows) == len(stored)
    finals = {row.job_id for row in rows if row.status == "completed"}
    holding = {reservation.job_id: reservation.amount for reservation in held}
    assert not finals & set(holding), f"settled and still holding money: {finals & set(holding)}"
    # Every job reserved RESERVE: what its rows took of it plus what it still holds is that, to the cent (a job
    # between its lost attempt and its final one holds what the lost attempt did not use).
    taken: dict[str, Decimal] = {}
    for row in rows:
        taken[row.job_id] = taken.get(row.job_id, Decimal(0)) + row.reserved_usd
    for job_id in set(taken) | set(holding):
        assert taken.get(job_id, Decimal(0)) + holding.get(job_id, Decimal(0)) == RESERVE, job_id
    assert snapshot.day.spent == sum((row.actual_usd or Decimal(0) for row in rows), Decimal(0))
    assert snapshot.day.reserved == sum(holding.values(), Decimal(0))
    return len(rows)


@pytest.mark.timeout(120)
def test_kill_9_during_ledger_writes_leaves_the_ledger_readable_and_consistent(
    burst_home: Path, tmp_path: Path, fault_ledger: Any
) -> None:
    path = db_file(burst_home)
    Budget(path).close()
    stop = tmp_path / "stop-steady-writer"
    # A second writer the whole time, through every kill: busy waits must stay inside the budget's busy timeout.
    steady = _writer(path, "steady", str(stop))
    rng = random.Random()
    counts = [_check_consistent(path)]
    try:
        for kill in range(KILLS):
            victim = _writer(path, f"victim{kill}", "forever")
            time.sleep(rng.uniform(0.0, 0.15))
            victim.kill()  # SIGKILL: no finally, no atexit, maybe mid-transaction
            _, err = victim.communicate(timeout=30)
            assert victim.returncode == -9, err  # it was still writing when killed, not dead of an error
            counts.append(_check_consistent(path))
            # New writes go through on the file the killed process left.
            with Budget(path) as budget:
                budget.reserve(job_id=f"after-{kill}", name=None, provider="runpod", gpu="RTX_4090",
                               amount=RESERVE, now=NOW)
                budget.settle(f"after-{kill}", provider="runpod", instance_id="i", gpu="RTX_4090",
                              rate_usd_per_hour=Decimal("0.34"), started_at=NOW, ended_at=NOW,
                              actual_usd=Decimal("0.01"), status="completed")
    finally:
        stop.touch()
        out, err = steady.communicate(timeout=60)
    assert steady.returncode == 0 and err == "", err
    assert int(out) > 0  # the steady writer got through jobs while the others were being killed
    assert counts[-1] > counts[0] + KILLS  # the victims wrote rows: the kills landed among writes
    _check_consistent(path)
    fault_ledger.record(KILL_CASE, trials=KILLS, faults=KILLS)
