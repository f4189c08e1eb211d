"""The Python API on the real local provider: burst.run, burst.submit, await burst.burst, ledger and budgets.

Run outside any cell (get_ipython() may be the test shell or None; both show text lines).
"""

from __future__ import annotations

import asyncio
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import (
    MoneyClock,
    job_event,
    ledger_rows,
    live_instances,
    local_jobdirs,
    open_reservations,
    state_row_count,
)

import burst_jupyter as burst
from burst_jupyter import BurstError, ConfigError, EventType, Job, JobResult, JobSpec, JobStatus, RemoteError
from burst_jupyter.errors import BudgetExceededError, BudgetKilled, VariableError
from burst_jupyter.session import Session

pytestmark = pytest.mark.timeout(60)

PUSHED_FROM_MODULE_GLOBALS = 21


def assert_clean(home: Path) -> None:
    assert local_jobdirs(home) == []
    assert live_instances(home) == []
    assert open_reservations(home) == []


def test_run_returns_values_result_and_a_decimal_cost(burst_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = burst.run(JobSpec(name="api", cell="import sys\nx = 6 * 7\nprint('hello')\nprint('oops', "
                                                "file=sys.stderr)\nx + 1", pull=["x"], rate_usd_per_hour=1,
                               max_cost_usd="0.5"))
    assert isinstance(result, JobResult)
    assert result.status is JobStatus.COMPLETED and result.error is None
    assert result.values == {"x": 42}
    assert repr(result.result) == "43"
    assert isinstance(result.total_cost_usd, Decimal) and Decimal(0) < result.total_cost_usd <= Decimal("0.5")
    out, err = capsys.readouterr()
    assert "hello\n" in out and "oops\n" in err
    [row] = ledger_rows(burst_home)
    assert (row.job_id, row.name, row.status, row.provider) == (result.job_id, "api", "completed", "local")
    assert row.actual_usd == result.total_cost_usd
    assert row.reserved_usd == Decimal("0.5")
    assert_clean(burst_home)


def test_run_raises_remote_error_for_a_failing_cell(burst_home: Path) -> None:
    with pytest.raises(RemoteError) as caught:
        burst.run(JobSpec(cell="a = 1\nb = a / 0\n"))
    assert caught.value.ename == "ZeroDivisionError"
    tb = "\n".join(caught.value.traceback)
    assert '"<burst-cell>", line 2' in tb and "b = a / 0" in tb
    [row] = ledger_rows(burst_home)
    assert row.status == "failed"
    assert_clean(burst_home)


def test_run_pushes_from_a_namespace_or_the_callers_globals() -> None:
    result = burst.run(JobSpec(cell="y = base * 2", push=["base"], pull=["y"]), namespace={"base": 5})
    assert result.values == {"y": 10}
    result = burst.run(JobSpec(cell="z = PUSHED_FROM_MODULE_GLOBALS + 1", push=["PUSHED_FROM_MODULE_GLOBALS"],
                               pull=["z"]))
    assert result.values == {"z": 22}


def test_run_refuses_bad_input_before_renting(burst_home: Path) -> None:
    with pytest.raises(VariableError, match="--push nowhere"):
        burst.run(JobSpec(cell="print(nowhere)", push=["nowhere"]), namespace={})
    with pytest.raises(ConfigError, match="unknown provider"):
        burst.run(JobSpec(cell="1", provider="nope"))
    with pytest.raises(ConfigError, match="--image needs a marketplace provider"):
        burst.run(JobSpec(cell="1", image="python:3.12", provider="local"))
    with pytest.raises(ConfigError, match="syntax error"):
        burst.run(JobSpec(cell="def (:"))
    with pytest.raises(ConfigError, match="max_cost_usd"):
        JobSpec.build(cell="1", max_cost_usd="-3")
    assert local_jobdirs(burst_home) == [] and state_row_count(burst_home) == 0
    assert ledger_rows(burst_home) == []


def test_run_over_the_daily_budget_raises_budget_exceeded(burst_home: Path) -> None:
    burst.set_daily_budget(usd="0.10")
    with pytest.raises(BudgetExceededError, match="daily budget"):
        burst.run(JobSpec(cell="print(1)", rate_usd_per_hour=1, max_cost_usd=1))
    assert local_jobdirs(burst_home) == [] and state_row_count(burst_home) == 0
    assert ledger_rows(burst_home) == [] and open_reservations(burst_home) == []


def test_run_a_command_and_its_exit_status(burst_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = burst.run(JobSpec(command=[sys.executable, "-c", "print('from a command')"]))
    assert result.status is JobStatus.COMPLETED
    assert "from a command" in capsys.readouterr().out
    with pytest.raises(BurstError, match="exited with status 4"):
        burst.run(JobSpec(command=[sys.executable, "-c", "import sys; sys.exit(4)"]))
    assert [r.status for r in ledger_rows(burst_home)] == ["completed", "failed"]
    assert_clean(burst_home)


def test_run_with_mounts_lists_the_files_that_came_back(tmp_path: Path) -> None:
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "n.txt").write_text("4")
    result = burst.run(JobSpec(cell="n = int(open('in/n.txt').read())\nopen('out/sq.txt', 'w').write(str(n * n))",
                               mount_local=[("./inputs", "in:ro"), ("./outputs", "out:rw")]))
    assert (tmp_path / "outputs" / "sq.txt").read_text() == "16"
    assert [p.name for p in result.files] == ["sq.txt"]


def test_budget_killed_through_the_api(tmp_path: Path, burst_home: Path) -> None:
    # $1/s; money stands still until the cell starts, then leaves 3 s: the cap stops it (test_magic_jobs.py).
    clock = Session.current().clock = MoneyClock()
    clock.advance_once(job_event(EventType.STARTED), 8.2)
    with pytest.raises(BudgetKilled, match="cost cap"):
        burst.run(JobSpec(cell="import time\ntime.sleep(50)", rate_usd_per_hour=3600, max_cost_usd="11.2"))
    [row] = ledger_rows(burst_home)
    assert row.status == "budget_killed"
    assert row.actual_usd is not None and row.actual_usd <= Decimal("11.2")
    assert_clean(burst_home)


def test_await_burst_returns_a_job(burst_home: Path) -> None:
    async def main() -> tuple[Job, JobResult, list[Any]]:
        job = await burst.burst(JobSpec(cell="burst.progress(10)\nprint('async')\nv = 3", pull=["v"]))
        assert isinstance(job, Job)
        events = [e async for e in job.stream_events()]
        return job, await job, events

    job, result, events = asyncio.run(main())
    assert result.status is JobStatus.COMPLETED and result.values == {"v": 3}
    assert events[0].type is EventType.QUEUED and events[-1].type is EventType.COMPLETED
    assert sum(e.is_final for e in events) == 1
    assert "".join(e.text or "" for e in events if e.type is EventType.OUTPUT) == "async\n"
    assert job in burst.jobs()
    assert_clean(burst_home)


def test_submit_then_wait_and_a_second_stream_replays_everything() -> None:
    job = burst.submit(JobSpec(cell="print('one')\nprint('two')"))
    result = job.wait(timeout=50)
    assert result.status is JobStatus.COMPLETED
    assert job.status is JobStatus.COMPLETED

    async def replay() -> list[Any]:
        return [e async for e in job.stream_events()]

    assert asyncio.run(replay()) == job.events
    assert "".join(e.text or "" for e in job.events if e.type is EventType.OUTPUT) == "one\ntwo\n"


def test_cancel_before_the_job_starts_rents_nothing_it_keeps(burst_home: Path) -> None:
    job = burst.submit(JobSpec(cell="import time\ntime.sleep(50)"))
    job.cancel()
    result = job.wait(timeout=50)
    assert result.status is JobStatus.CANCELLED
    assert [e.type for e in job.events if e.is_final] == [EventType.CANCELLED]
    assert_clean(burst_home)


def test_ledger_budget_and_caps_through_the_api(burst_home: Path) -> None:
    burst.set_daily_budget(usd=50)
    burst.set_weekly_budget(usd=200)
    burst.run(JobSpec(name="<script>alert(1)</script>", cell="pass", rate_usd_per_hour="7.2", max_cost_usd=1))
    table = burst.ledger()
    assert len(table.rows) == 1 and isinstance(table.total, Decimal)
    html = table._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html
    [group] = burst.ledger().by("provider").groups
    assert (group.key, group.jobs) == ("local", 1)
    bars = burst.budget_bars()
    assert "$50.00" in repr(bars) and "$200.00" in repr(bars)
    with pytest.raises(ConfigError, match="negative"):
        burst.set_daily_budget(usd=-1)
    from burst_jupyter.session import Session

    Session.reset_current()
    assert Session.current().budget.caps() == {"day": Decimal(50), "week": Decimal(200)}
