"""The ``burst`` console script, called in-process (``main([...])``) against the real local provider and, for the
marketplace commands, the three provider fakes (tests/marketplaces.py).

A job submitted from the CLI and one from the notebook API share the state store, the ledger and the per-job
event logs, so ``burst show`` and ``burst kill`` work on either, from any process.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import (
    ledger_rows,
    live_instances,
    local_jobdirs,
    open_reservations,
    run_cell,
    state_row,
    wait_until,
)
from marketplaces import Markets

import burst_jupyter as burst
from burst_jupyter import EventType, JobSpec, JobStatus
from burst_jupyter.cli import main
from burst_jupyter.errors import RemoteError
from burst_jupyter.events import JobEvent
from burst_jupyter.job_log import JobLogWriter, job_log_path, read_events

pytestmark = pytest.mark.timeout(60)

Capsys = pytest.CaptureFixture[str]
# Prints a tick every 50 ms until stopped: long enough for any test, cut short by `burst kill`.
TICKING = "import time\nfor i in range(1200):\n    print('tick', i, flush=True)\n    time.sleep(0.05)\n"


def assert_clean(home: Path) -> None:
    assert local_jobdirs(home) == [] and live_instances(home) == [] and open_reservations(home) == []


def started(job_id: str) -> bool:
    return any(e.type is EventType.STARTED for e in read_events(job_id) or [])


def test_submit_a_command_then_show_it(burst_home: Path, capsys: Capsys) -> None:
    assert main(["submit", "--provider", "local", "--name", "hello", "--",
                 sys.executable, "-c", "import sys; print('from the cli'); print('to stderr', file=sys.stderr)"]) == 0
    out, _ = capsys.readouterr()
    assert "from the cli" in out and "[burst] job 'hello'" in out
    [row] = ledger_rows(burst_home)
    assert (row.name, row.provider, row.status) == ("hello", "local", "completed")

    assert main(["show", row.job_id]) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"job {row.job_id}: completed"
    assert "  name:     hello" in lines and f"  provider: local (instance {row.job_id})" in lines
    output = lines[lines.index("output:") + 1:lines.index("ledger:")]
    assert output == ["  from the cli", "  to stderr"]
    assert row.job_id in lines[lines.index("ledger:") + 3] and "completed" in lines[lines.index("ledger:") + 3]

    assert main(["show", row.job_id, "--lines", "1", "--events"]) == 0
    out, _ = capsys.readouterr()
    assert "output (last 1 of 2 lines; --lines N for more):\n  to stderr\n" in out
    assert "events:" in out and "started · instance" in out and "completed · total $0.00" in out
    assert_clean(burst_home)


def test_submit_exit_status_and_bad_input(burst_home: Path, capsys: Capsys) -> None:
    # The seed's --command "STRING" form; a failing command is exit status 1 with one line saying why.
    assert main(["submit", "--provider", "local", "--command", f"{sys.executable} -c 'import sys; sys.exit(3)'"]) == 1
    assert "burst: job job-" in capsys.readouterr().err
    [row] = ledger_rows(burst_home)
    assert row.status == "failed" and row.message == "the command exited with status 3"
    for argv, says in [
        (["submit", "--provider", "local"], "give one of --file FILE.py"),
        (["submit", "--command", "true", "--", "false"], "not both"),
        (["submit", "--command", "echo 'unclosed"], "--command"),
        (["submit", "--max-cost-usd", "lots", "--command", "true"], "--max-cost must be a number of USD"),
        (["submit", "--provider", "locl", "--command", "true"], "did you mean local"),
        (["submit", "--file", "missing.py"], "--file missing.py"),
        (["submit", "--provider", "local", "--image", "python:3.12", "--command", "true"], "--image needs a market"),
        (["submit", "--provider", "local", "--gpus", "0", "--command", "true"], "gpus: must be 1 to 16, not 0"),
        (["submit", "--provider", "local", "--provision-timeout", "inf", "--command", "true"], "a finite number"),
        (["submit", "--provider", "local", "--mount", r"C:\Users\me\data:data:rw", "--command", "true"],
         "is a Windows path"),
        (["offers", "--gpus", "0"], "--gpus must be 1 to 16, not 0"),
        (["kill", "some-job", "--wait", "nan"], "--wait must be a number of seconds, 0 or more"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("burst: ") and err.count("\n") == 1 and says in err, (argv, err)
    assert main(["submit", "--gpus", "two"]) == 2  # argparse's own usage error, not a traceback
    assert "invalid int value" in capsys.readouterr().err
    assert len(ledger_rows(burst_home)) == 1 and local_jobdirs(burst_home) == []
    assert not Path("C").exists()
    # A dry run is not bad input, and it writes nothing in the user's folders.
    assert main(["submit", "--provider", "local", "--dry-run", "--mount", "./new-out:out:rw", "--command", "true"]) == 0
    assert "nothing was rented (--dry-run)" in capsys.readouterr().out and not Path("new-out").exists()


def test_list_show_and_kill_a_running_notebook_job(burst_home: Path, capsys: Capsys) -> None:
    # Started by the notebook API in this process; the CLI reaches it through the state store, its event log and
    # its agent, exactly as from another terminal.
    job = burst.submit(JobSpec(name="ticker", cell=TICKING, rate_usd_per_hour=1, max_cost_usd="0.5"))
    wait_until(lambda: started(job.id), "the job started")

    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["JOB", "PROVIDER", "INSTANCE", "$/H", "STATE", "OWNER"]
    assert out[1].split()[:5] == [job.id, "local", job.id, "$1.00", "launched"]

    wait_until(lambda: "tick 2\n" in "".join(e.text or "" for e in read_events(job.id) or []), "some output")
    assert main(["show", job.id, "--lines", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {job.id}: running\n") and "  rate:     $1.00/h\n" in out
    assert "so far, cap $0.50" in out and "  owner:    pid " in out and "  tick " in out

    assert main(["kill", job.id]) == 0
    out = capsys.readouterr().out
    assert f"asked job {job.id}'s agent on local to stop" in out
    assert f"job {job.id} ended: cancelled" in out
    result = job.wait(timeout=30)
    assert result.status is JobStatus.CANCELLED and result.error is None
    [row] = ledger_rows(burst_home)
    assert (row.job_id, row.status) == (job.id, "cancelled")
    assert row.actual_usd is not None and Decimal(0) < row.actual_usd <= Decimal("0.5")
    assert state_row(burst_home, job.id).state == "terminated"
    assert_clean(burst_home)

    assert main(["kill", job.id]) == 0  # already over: said so, nothing else
    assert capsys.readouterr().out == f"job {job.id} already ended: cancelled\n"
    assert main(["list"]) == 0 and capsys.readouterr().out == "no job holds an instance\n"


def test_kill_a_job_whose_process_is_gone_hands_it_to_the_reaper(burst_home: Path, tmp_path: Path,
                                                                   capsys: Capsys) -> None:
    owner = textwrap.dedent(f"""
        import burst_jupyter as burst
        job = burst.submit(burst.JobSpec(name="orphan", cell={TICKING!r}, rate_usd_per_hour=1, max_cost_usd="0.5"))
        print(job.id, flush=True)
        job.wait()
    """)
    proc = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().strip()
        wait_until(lambda: started(job_id), "the job started")
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()

    assert main(["show", job_id]) == 0
    assert f"job {job_id}: orphaned" in capsys.readouterr().out
    assert main(["kill", job_id]) == 0
    out = capsys.readouterr().out
    assert "is gone; ending it here" in out and f"job {job_id} cancelled: synced back 0 file(s), terminated" in out
    [row] = ledger_rows(burst_home)
    assert (row.job_id, row.status) == (job_id, "cancelled") and row.actual_usd is not None
    assert_clean(burst_home)
    assert main(["show", job_id, "--lines", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {job_id}: cancelled\n") and "note:     burst kill; finished by the reaper" in out


def test_an_unknown_job_is_exit_2_with_the_close_matches(burst_home: Path, capsys: Capsys) -> None:
    assert main(["submit", "--provider", "local", "--command", "true"]) == 0
    [row] = ledger_rows(burst_home)
    typo = row.job_id[:-1] + ("x" if row.job_id[-1] != "x" else "y")
    capsys.readouterr()
    for command in ("show", "kill"):
        assert main([command, typo]) == 2
        assert capsys.readouterr().err == f"burst: no job {typo!r}; did you mean {row.job_id}?\n"
    assert main(["show", "../../etc/passwd"]) == 2
    assert "no job '../../etc/passwd' (burst list shows the running jobs" in capsys.readouterr().err


def test_budget_set_and_show(capsys: Capsys) -> None:
    assert main(["budget", "set", "--daily", "5"]) == 0
    capsys.readouterr()
    assert main(["budget", "show"]) == 0
    assert capsys.readouterr().out == ("Today: $0.00 / $5.00 (0%)\nThis week: $0.00 (no cap)\n"
                                       "daily cap $5.00: set with burst budget set, for every folder\n"
                                       "weekly cap: none\n")
    assert main(["budget", "set", "--daily", "none", "--weekly", "200"]) == 0
    assert capsys.readouterr().out == ("Today: $0.00 (no cap)\nThis week: $0.00 / $200.00 (0%)\n"
                                       "daily cap: none\n"
                                       "weekly cap $200.00: set with burst budget set, for every folder\n")
    assert main(["budget", "set", "--daily", "-1"]) == 2
    assert "cannot be negative" in capsys.readouterr().err


def test_providers_without_keys_say_what_to_set(capsys: Capsys) -> None:
    assert main(["providers", "status"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "vast: not configured (set VAST_API_KEY)",
        "runpod: not configured (set RUNPOD_API_KEY)",
        "thunder: not configured (set TNR_API_TOKEN)",
        "lambda: not configured (set LAMBDA_API_KEY)",
    ]
    assert main(["offers", "--gpu", "RTX_4090"]) == 2
    assert "no marketplace is configured" in capsys.readouterr().err


def test_the_job_log_round_trips_events_and_skips_a_torn_line(burst_home: Path) -> None:
    at = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    events = [JobEvent(type=EventType.PROVISIONED, job_id="j-1", at=at, provider="vast", instance_id="42",
                       cost_per_hour_usd=Decimal("0.298"), max_cost_usd=Decimal("1")),
              JobEvent(type=EventType.OUTPUT, job_id="j-1", at=at, stream="stderr", text="naïve ✓\n"),
              JobEvent(type=EventType.COMPLETED, job_id="j-1", at=at, total_cost_usd=Decimal("0.000083"))]
    writer = JobLogWriter("j-1", burst_home)
    for event in events:
        writer(event)
    assert writer._file is None  # closed at the final event
    path = job_log_path("j-1", burst_home)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["cost_per_hour_usd"] == "0.298" and first["at"] == "2026-01-02T03:04:05.678000+00:00"
    with path.open("a") as f:
        f.write('{"type": "output", "job_id": "j-1", "te')  # a writer that died mid-line
    assert read_events("j-1", burst_home) == events
    assert read_events("nope", burst_home) is None
    with pytest.raises(ValueError):
        job_log_path("../x", burst_home)


# -- the marketplace fakes --------------------------------------------------------------------------------------


@pytest.mark.ssh
def test_providers_offers_and_a_dry_run(markets: Markets, burst_home: Path, capsys: Capsys) -> None:
    assert main(["providers", "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["vast", "runpod", "thunder", "lambda"]
    assert all(": available, " in line for line in lines)
    assert "lowest RTX_4090 = $0.298/hr" in lines[0] and "lowest RTX_4090 = $0.34/hr" in lines[1]

    assert main(["offers", "--gpu", "rtx 4090", "--max-price", "0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "RTX_4090 ×1 · ≤ $0.50/h · all providers" in out[0]
    rows = [line.split()[0] for line in out[2:] if line.strip()]
    assert rows[:2] == ["vast", "runpod"] and "thunder" not in rows
    assert main(["offers", "--gpu", "RTX_4090", "--provider", "runpod", "--sort", "reliability", "--refresh"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()]
    assert rows and set(rows) == {"runpod"}

    assert main(["submit", "--gpu", "RTX_4090", "--max-cost", "1", "--dry-run",
                 "--command", "python3 -c 'print(1)'"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would rent: vast 1 x RTX_4090 at $0.298/h") and "worst case: $1.00" in out
    assert "nothing was rented (--dry-run)" in out
    assert markets.creates() == 0 and ledger_rows(burst_home) == []


@pytest.mark.ssh
def test_a_cli_job_on_vast_and_a_notebook_job_share_the_ledger(markets: Markets, burst_home: Path,
                                                              capsys: Capsys) -> None:
    assert main(["submit", "--gpu-model", "RTX_4090", "--max-cost-usd", "1", "--name", "from-cli",
                 "--command", "python3 -c 'print(42)'"]) == 0
    out = capsys.readouterr().out
    assert "42\n" in out and "[burst] offer selected · vast · RTX_4090 · $0.298/h" in out
    [cli_row] = ledger_rows(burst_home)
    assert (cli_row.name, cli_row.provider, cli_row.status, cli_row.rate_usd_per_hour) == (
        "from-cli", "vast", "completed", Decimal("0.298"))
    assert markets.creates() == 1

    result = burst.run(JobSpec(name="from-notebook", cell="print(7)", provider="local"))
    assert result.status is JobStatus.COMPLETED
    rows = {r.job_id: r for r in ledger_rows(burst_home)}
    assert sorted(r.name or "" for r in rows.values()) == ["from-cli", "from-notebook"]

    capsys.readouterr()
    assert main(["ledger", "--by", "provider"]) == 0
    table = capsys.readouterr().out
    assert any(line.split()[:2] == ["local", "1"] for line in table.splitlines())
    assert any(line.split()[:2] == ["vast", "1"] for line in table.splitlines())
    assert main(["show", cli_row.job_id]) == 0  # a finished marketplace job, from its log and its ledger row
    out = capsys.readouterr().out
    assert out.startswith(f"job {cli_row.job_id}: completed\n")
    assert f"  provider: vast (instance {cli_row.instance_id}, RTX_4090)" in out and "  rate:     $0.298/h" in out
    assert "output:\n  42\n" in out


def test_submit_sends_no_remote_escape_to_the_terminal(burst_home: Path, tmp_path: Path) -> None:
    """A real `burst submit` process: what the cell prints and the traceback it raises carry a clipboard write
    (OSC 52), a title and cursor moves; none of it reaches the terminal (or a log shown in one later)."""
    hostile = "\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\x1b]0;pwned\x07\x1b[2A\x1b[2K"
    script = tmp_path / "hostile.py"
    script.write_text(f"print({'printed' + hostile!r})\nraise ValueError({'boom' + hostile!r})\n")
    proc = subprocess.run([sys.executable, "-m", "burst_jupyter.cli", "submit", "--provider", "local", "--max-cost",
                           "1", "--file", str(script)], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert b"printed" in proc.stdout and b"ValueError: boom" in proc.stderr
    assert proc.stderr.startswith(b"Traceback (most recent call last):\n"), proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert b"\x1b" not in stream and b"\x07" not in stream, stream
    # Later, from any process: the error it failed with and its events quote the same text.
    [row] = ledger_rows(burst_home)
    shown = subprocess.run([sys.executable, "-m", "burst_jupyter.cli", "show", row.job_id, "--events"],
                           capture_output=True, timeout=60, check=False)
    assert shown.returncode == 0 and b"error:    ValueError: boom" in shown.stdout, shown
    assert b"\x1b" not in shown.stdout + shown.stderr and b"\x07" not in shown.stdout + shown.stderr, shown.stdout
    assert_clean(burst_home)


def test_terminal_ipython_shows_a_remote_traceback_without_its_escapes(ip: object, burst_home: Path) -> None:
    """Terminal IPython (no kernel) prints what ``_render_traceback_`` returns as it stands."""
    hostile = "\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\x1b[2A"
    result, _ = run_cell(ip, f"%%burst --provider local --max-cost 1\nraise ValueError({'boom' + hostile!r})\n")
    error = result.error_in_exec
    assert isinstance(error, RemoteError)
    shown = "\n".join(error._render_traceback_())
    assert "ValueError: boom" in shown and "\x1b" not in shown and "\x07" not in shown, shown


def test_ctrl_c_in_burst_submit_says_what_became_of_the_job_in_one_line(burst_home: Path, tmp_path: Path) -> None:
    script = tmp_path / "ticking.py"
    script.write_text(TICKING)
    proc = subprocess.Popen([sys.executable, "-m", "burst_jupyter.cli", "submit", "--provider", "local",
                             "--max-cost", "1", "--file", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line == "tick 2\n":
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("burst: job ") and " cancelled by Ctrl-C · " in last and last.endswith("settled $0.00"), err
    assert "Traceback" not in err, err
    assert_clean(burst_home)


def test_a_notebook_and_a_terminal_route_through_one_table_of_commands(ip: Any) -> None:
    import argparse

    from IPython.core.error import UsageError

    from burst_jupyter.commands import COMMANDS, parser

    def options(where: Any) -> dict[str, set[str]]:
        (sub,) = [a for a in parser(where)._actions if isinstance(a, argparse._SubParsersAction)]
        return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}

    terminal, notebook = options("burst"), options("%burst")
    assert list(terminal) == [c.name for c in COMMANDS if "burst" in c.where]
    assert list(notebook) == [c.name for c in COMMANDS if "%burst" in c.where]
    for name in set(terminal) & set(notebook):  # the same options, but for what a terminal alone prints
        assert terminal[name] - {"-h", "--help", "--json"} == notebook[name], name
    assert terminal["offers"] >= {"--gpu", "--gpu-model", "--gpus", "--max-price", "--provider", "--spot"}
    with pytest.raises(UsageError) as unknown:
        ip.run_line_magic("burst", "lease")
    assert str(unknown.value) == ("%burst lease: unknown command; try offers, providers, ledger, budget, jobs, up, "
                                  "down, machines, shutdown, cleanup or help")
    assert ip.run_line_magic("burst", "ledger --by provider").groups == ip.run_line_magic("burst",
                                                                                         "ledger provider").groups
