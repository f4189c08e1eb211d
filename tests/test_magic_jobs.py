"""%%burst jobs that end early or run on: budget caps and the ledger, --background handles, Ctrl-C.

Real local jobs, real SQLite; a real SIGINT delivered to this (the main) thread for Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import (
    MoneyClock,
    cell,
    job_event,
    last_job,
    ledger_rows,
    live_instances,
    local_jobdirs,
    open_reservations,
    recorded,
    run_cell,
    state_row,
    state_row_count,
    usage_line,
    wait_until,
)

import burst_jupyter as burst
from burst_jupyter.events import EventType
from burst_jupyter.job import Job, JobStatus
from burst_jupyter.session import Session

pytestmark = pytest.mark.timeout(60)

# The order every job goes through (output, progress and budget warnings may come in between).
LIFECYCLE = [EventType.QUEUED, EventType.OFFER_SELECTED, EventType.BUDGET_RESERVED, EventType.PROVISIONING,
             EventType.PROVISIONED, EventType.SSH_READY, EventType.PROTECTED,
             EventType.SYNCING_UP, EventType.STARTED]
INTERLUDE = {EventType.OUTPUT, EventType.PROGRESS, EventType.BUDGET_WARNING}



def assert_gone_and_settled(home: Path, job: Job, status: str) -> None:
    """The instance is gone, the state store says so, the ledger has the job's one row."""
    assert local_jobdirs(home) == []
    assert live_instances(home) == []
    row = state_row(home, job.id)
    assert row is not None and row.state == "terminated"
    rows = [r for r in ledger_rows(home) if r.job_id == job.id]
    assert len(rows) == 1
    assert rows[0].status == status
    assert isinstance(rows[0].actual_usd, Decimal)
    assert open_reservations(home) == []


def stage_names(job: Job) -> list[EventType]:
    return [e.type for e in job.events if e.type not in INTERLUDE]


# -- budget and ledger --------------------------------------------------------------------------------------


def test_a_job_over_the_daily_cap_rents_nothing(ip: Any, burst_home: Path) -> None:
    burst.set_daily_budget(usd=1)
    result, _ = run_cell(ip, cell("--max-cost 2 --rate 1", "print('should not run')"))
    line = usage_line(result)
    assert "daily budget" in line
    assert local_jobdirs(burst_home) == []
    assert state_row_count(burst_home) == 0
    assert live_instances(burst_home) == []
    assert ledger_rows(burst_home) == [] and open_reservations(burst_home) == []
    # Within the cap it runs.
    result, _ = run_cell(ip, cell("--max-cost 0.5 --rate 1", "print('fits')"))
    assert result.error_in_exec is None


def test_set_daily_budget_persists_across_sessions(ip: Any, burst_home: Path) -> None:
    from burst_jupyter.budget import Budget
    from burst_jupyter.session import Session

    burst.set_daily_budget(usd=50)
    burst.set_weekly_budget(usd="200")
    Session.reset_current()
    assert Session.current().budget.caps() == {"day": Decimal(50), "week": Decimal(200)}
    with Budget(burst_home / "burst.sqlite3") as budget:
        assert budget.caps()["day"] == Decimal(50)
    burst.set_daily_budget(usd=None)
    Session.reset_current()
    assert Session.current().budget.caps()["day"] is None


def test_a_job_is_stopped_at_its_cost_cap(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    # $1/s. The cap must cover start and stop (about 11 s), so 11.5 buys a few seconds of run time. Money stands
    # still until the cell works, then moves on to leave 3 s of it: less than a stop keeps back on the local
    # provider (4 s: stop_policy.py), more than the terminate alone (1.5 s). The cap stops the job at once.
    clock = Session.current().clock = MoneyClock()
    clock.advance_once(job_event(EventType.OUTPUT, "working"), 8.5)
    out = tmp_path / "out"
    out.mkdir()
    result, streams = run_cell(ip, cell("--rate 3600 --max-cost 11.5 --mount ./out:out:rw", """
        import time
        open("out/before.txt", "w").write("written before the cap")
        print("working", flush=True)
        time.sleep(50)
        open("out/after.txt", "w").write("must not happen")
    """))
    line = usage_line(result)
    assert "cost cap" in line
    job = last_job()
    assert job.status is JobStatus.BUDGET_KILLED
    finals = [e for e in job.events if e.is_final]
    assert [e.type for e in finals] == [EventType.BUDGET_KILLED]
    assert any(e.type is EventType.STOPPING for e in job.events)
    assert finals[0].total_cost_usd is not None and finals[0].total_cost_usd <= Decimal("11.5")
    assert (out / "before.txt").read_text() == "written before the cap"
    assert not (out / "after.txt").exists()
    assert "working" in streams.text("stdout")
    assert_gone_and_settled(burst_home, job, "budget_killed")
    [row] = ledger_rows(burst_home)
    assert row.actual_usd is not None and Decimal(0) < row.actual_usd <= Decimal("11.5")
    assert (row.provider, row.instance_id, row.reserved_usd) == ("local", job.id, Decimal("11.5"))
    assert row.rate_usd_per_hour == Decimal(3600)


def test_ledger_rows_and_the_ledger_and_budget_magics(ip: Any, burst_home: Path) -> None:
    burst.set_daily_budget(usd=20)
    for name in ("<b>first</b>", "second"):
        result, _ = run_cell(ip, cell(f"--rate 1.8 --max-cost 1 --name '{name}'", "print('x')"))
        assert result.error_in_exec is None
    jobs = burst.jobs()[-2:]
    rows = ledger_rows(burst_home)
    assert [r.job_id for r in rows] == [j.id for j in jobs]
    for row in rows:
        assert row.provider == "local" and row.status == "completed"
        assert isinstance(row.actual_usd, Decimal) and Decimal(0) < row.actual_usd <= Decimal(1)
        assert row.instance_id in {j.id for j in jobs}
        assert row.ended_at is not None and row.ended_at >= row.started_at
    table = ip.run_line_magic("burst", "ledger")
    assert len(table.rows) == 2 and table.total == sum(r.actual_usd for r in rows)
    html = table._repr_html_()
    assert "&lt;b&gt;first&lt;/b&gt;" in html and "<b>first</b>" not in html
    assert "second" in repr(table)
    grouped = burst.ledger().by("provider")
    [group] = grouped.groups
    assert (group.key, group.jobs, group.actual) == ("local", 2, table.total)
    assert ip.run_line_magic("burst", "ledger provider").groups == grouped.groups
    bars = ip.run_line_magic("burst", "budget")
    assert "$20.00" in repr(bars)
    bars = ip.run_line_magic("burst", "budget --daily 30")
    assert "$30.00" in repr(bars)
    assert burst.ledger().rows == table.rows


# -- background ---------------------------------------------------------------------------------------------


def test_background_returns_a_job_at_once_then_wait(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    go = tmp_path / "go"
    result, _ = run_cell(ip, cell("--background --pull answer", f"""
        import os, time
        for _ in range(3000):
            if os.path.exists({str(go)!r}):
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("no go")
        answer = 42
        print("finished")
    """))
    job = result.result
    assert isinstance(job, Job)
    assert not job.done()  # it cannot end before the go file exists
    go.touch()
    done = job.wait(timeout=50)
    assert done.status is JobStatus.COMPLETED and done.error is None
    assert done.values == {"answer": 42}
    assert isinstance(done.total_cost_usd, Decimal)
    types = stage_names(job)
    assert types == [*LIFECYCLE, EventType.SYNCING_DOWN, EventType.TERMINATED, EventType.COMPLETED]
    assert sum(e.is_final for e in job.events) == 1
    assert_gone_and_settled(burst_home, job, "completed")


def test_background_cancel_syncs_back_and_settles(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    (tmp_path / "out").mkdir()
    result, _ = run_cell(ip, cell("--background --rate 0.36 --max-cost 1 --mount ./out:out:rw", """
        import time
        open("out/progress.txt", "w").write("epoch 1")
        print("ready", flush=True)
        time.sleep(50)
    """))
    job = result.result
    wait_until(lambda: any(e.type is EventType.OUTPUT and "ready" in (e.text or "") for e in job.events),
               "the background cell printed ready")
    job.cancel()
    done = job.wait(timeout=50)
    assert done.status is JobStatus.CANCELLED
    assert job.status is JobStatus.CANCELLED
    assert (tmp_path / "out" / "progress.txt").read_text() == "epoch 1"
    finals = [e.type for e in job.events if e.is_final]
    assert finals == [EventType.CANCELLED]
    assert_gone_and_settled(burst_home, job, "cancelled")


def test_a_failing_background_job_shows_its_remote_traceback(ip: Any, burst_home: Path) -> None:
    with recorded() as streams:
        result = ip.run_cell(cell("--background", """
            def step():
                raise ZeroDivisionError("background boom")
            step()
        """), store_history=False)
        job = result.result
        assert isinstance(job, Job)
        done = job.wait(timeout=50)
        # Nobody waits on a background job to raise its error, so its cell shows the remote traceback.
        wait_until(lambda: "background boom" in streams.text("stderr"), "the traceback was shown")
    assert done.status is JobStatus.FAILED
    assert type(done.error).__name__ == "RemoteError"
    shown = streams.text("stderr")
    assert "Traceback (most recent call last):" in shown and "<burst-cell>" in shown
    assert "ZeroDivisionError: background boom" in shown
    assert_gone_and_settled(burst_home, job, "failed")


def test_await_job_and_stream_events(ip: Any, burst_home: Path) -> None:
    result, _ = run_cell(ip, cell("--background", """
        import sys
        print("out 1")
        burst.progress(50)
        print("err 1", file=sys.stderr)
        "the value"
    """))
    job = result.result

    async def follow() -> tuple[list[Any], Any]:
        seen = [e async for e in job.stream_events()]
        return seen, await job

    seen, done = asyncio.run(follow())
    assert done.status is JobStatus.COMPLETED and repr(done.result) == "'the value'"
    assert seen == job.events  # past and future events, each once, ending with the final one
    assert seen[-1].type is EventType.COMPLETED and sum(e.is_final for e in seen) == 1
    assert [e.type for e in seen if e.type not in INTERLUDE] == [
        *LIFECYCLE, EventType.SYNCING_DOWN, EventType.TERMINATED, EventType.COMPLETED]
    outputs = [(e.stream, e.text) for e in seen if e.type is EventType.OUTPUT]
    assert "".join(t for s, t in outputs if s == "stdout") == "out 1\n"
    assert "".join(t for s, t in outputs if s == "stderr") == "err 1\n"
    assert [e.percent for e in seen if e.type is EventType.PROGRESS] == [50.0]
    started = seen.index(next(e for e in seen if e.type is EventType.STARTED))
    down = seen.index(next(e for e in seen if e.type is EventType.SYNCING_DOWN))
    assert all(started < seen.index(e) < down for e in seen if e.type in (EventType.OUTPUT, EventType.PROGRESS))
    assert_gone_and_settled(burst_home, job, "completed")


# -- Ctrl-C -------------------------------------------------------------------------------------------------


def test_ctrl_c_cancels_syncs_terminates_and_settles_before_keyboardinterrupt(ip: Any, tmp_path: Path,
                                                                              burst_home: Path) -> None:
    (tmp_path / "out").mkdir()
    timers: list[threading.Timer] = []

    def on_write(stream: str, text: str) -> None:
        if "sleeping now" in text and not timers:
            timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT))
            timers.append(timer)
            timer.start()

    at_interrupt: dict[str, Any] = {}
    at_raise: dict[str, Any] = {}
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        at_interrupt["job_done"] = last_job().done()
        raise KeyboardInterrupt

    def on_keyboard_interrupt(shell: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> list[str]:
        # Runs the moment KeyboardInterrupt leaves the magic: everything must be over by then.
        job = last_job()
        at_raise.update(done=job.done(), status=job.status, jobdirs=local_jobdirs(burst_home),
                        checkpoint=(tmp_path / "out" / "checkpoint.txt").exists(),
                        ledger=[(r.job_id, r.status) for r in ledger_rows(burst_home)])
        return ["KeyboardInterrupt"]

    signal.signal(signal.SIGINT, on_sigint)
    ip.set_custom_exc((KeyboardInterrupt,), on_keyboard_interrupt)
    try:
        result, streams = run_cell(ip, cell("--rate 0.36 --max-cost 1 --mount ./out:out:rw", """
            import time
            open("out/checkpoint.txt", "w").write("step 3")
            print("sleeping now", flush=True)
            time.sleep(50)
            print("woke up")
        """), on_write=on_write)
    finally:
        ip.set_custom_exc((), None)
        signal.signal(signal.SIGINT, previous)
        for timer in timers:
            timer.cancel()
    assert at_interrupt == {"job_done": False}  # the interrupt came while the job ran
    job = last_job()
    assert at_raise == {"done": True, "status": JobStatus.CANCELLED, "jobdirs": [], "checkpoint": True,
                        "ledger": [(job.id, "cancelled")]}
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert job.done() and job.status is JobStatus.CANCELLED
    assert "woke up" not in streams.text()
    assert (tmp_path / "out" / "checkpoint.txt").read_text() == "step 3"
    assert [e.type for e in job.events if e.is_final] == [EventType.CANCELLED]
    assert EventType.TERMINATED in stage_names(job)
    assert_gone_and_settled(burst_home, job, "cancelled")
