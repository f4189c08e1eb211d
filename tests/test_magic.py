"""%%burst in a real IPython shell on the real local provider: output, remote errors, --push/--pull, config.

Every job really runs: the agent in subprocesses, the state store and ledger in SQLite under BURST_HOME.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import (
    cell,
    last_job,
    ledger_rows,
    live_instances,
    local_jobdirs,
    recorded,
    run_cell,
    state_row,
    state_row_count,
    usage_line,
)

from burst_jupyter.errors import RemoteError
from burst_jupyter.events import EventType
from burst_jupyter.job import JobStatus

pytestmark = pytest.mark.timeout(60)



def assert_clean(home: Path) -> None:
    """After a job: no instance left on this machine, nothing live in the state store."""
    assert local_jobdirs(home) == []
    assert live_instances(home) == []


# -- output -------------------------------------------------------------------------------------------------


def test_2000_lines_alternating_stdout_stderr_arrive_in_order_once(ip: Any, burst_home: Path) -> None:
    result, streams = run_cell(ip, cell("", """
        import sys
        for i in range(2000):
            print(f"line {i}", file=sys.stderr if i % 2 else sys.stdout)
    """))
    assert result.error_in_exec is None
    expected = [("stderr" if i % 2 else "stdout", f"line {i}") for i in range(2000)]
    assert streams.lines() == expected
    assert last_job().status is JobStatus.COMPLETED
    assert_clean(burst_home)


def test_print_and_shell_escapes_keep_their_order(ip: Any) -> None:
    result, streams = run_cell(ip, cell("", """
        import sys
        print("one")
        !echo two
        print("three", file=sys.stderr)
        get_ipython().system("echo four; echo five 1>&2")
        print("six")
        rc = get_ipython().system("exit 3")
        print("rc", rc)
    """))
    assert result.error_in_exec is None
    assert streams.lines() == [("stdout", "one"), ("stdout", "two"), ("stderr", "three"), ("stdout", "four"),
                               ("stdout", "five"), ("stdout", "six"), ("stdout", "rc 3")]


def test_output_streams_while_the_cell_runs(ip: Any, tmp_path: Path) -> None:
    """The cell waits for a file that the notebook side creates only when it has seen the cell's first line:
    if output arrived only at the end, the cell would give up and fail."""
    go = tmp_path / "go"

    def on_write(stream: str, text: str) -> None:
        if "waiting for go" in text:
            go.touch()

    result, streams = run_cell(ip, cell("", f"""
        import os, time
        print("waiting for go", flush=True)
        for _ in range(3000):
            if os.path.exists({str(go)!r}):
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("the notebook never saw the first line while the cell ran")
        print("got go")
    """), on_write=on_write)
    assert result.error_in_exec is None, streams.text()
    assert streams.lines() == [("stdout", "waiting for go"), ("stdout", "got go")]


def test_burst_progress_without_import_and_last_expression_is_the_value(ip: Any) -> None:
    result, streams = run_cell(ip, cell("", """
        burst.progress(25)
        burst.progress(100, "done")
        {"answer": 6 * 7}
    """))
    assert result.error_in_exec is None, streams.text()
    assert repr(result.result) == "{'answer': 42}"  # what the notebook shows; the value stays remote
    progress = [(e.percent, e.message) for e in last_job().events if e.type is EventType.PROGRESS]
    assert progress == [(100.0, "done")]  # the job's history keeps the latest progress (a flood stays bounded)


def test_a_cell_ending_in_a_statement_has_no_value(ip: Any) -> None:
    result, _ = run_cell(ip, cell("", "x = 1"))
    assert result.error_in_exec is None
    assert result.result is None


# -- remote errors and exit status ----------------------------------------------------------------------------


def test_remote_exception_fails_the_cell_with_its_remote_traceback(ip: Any, burst_home: Path) -> None:
    result, streams = run_cell(ip, cell("", """
        print("before")
        def inner():
            raise ValueError("boom from the instance")
        inner()
    """))
    error = result.error_in_exec
    assert isinstance(error, RemoteError)
    assert (error.ename, error.evalue) == ("ValueError", "boom from the instance")
    tb = "\n".join(error.traceback)
    assert '"<burst-cell>", line 4' in tb and "inner()" in tb
    assert '"<burst-cell>", line 3, in inner' in tb and 'raise ValueError("boom from the instance")' in tb
    shown = streams.text()
    assert "Traceback (most recent call last):" in shown and "<burst-cell>" in shown
    assert "ValueError: boom from the instance" in shown
    assert "before" in streams.text("stdout")
    job = last_job()
    assert job.status is JobStatus.FAILED
    assert [e.type for e in job.events if e.is_final] == [EventType.FAILED]
    [row] = ledger_rows(burst_home)
    assert (row.job_id, row.status) == (job.id, "failed")
    assert_clean(burst_home)


@pytest.mark.parametrize(("body", "fails"), [
    ("raise SystemExit(3)", True),
    ("import sys\nsys.exit('bad input')", True),
    ("raise SystemExit(0)", False),
    ("import sys\nsys.exit()", False),
])
def test_system_exit_in_the_cell(ip: Any, burst_home: Path, body: str, fails: bool) -> None:
    result, _ = run_cell(ip, cell("", "print('ran')\n" + body + "\nprint('not reached')"))
    job = last_job()
    if fails:
        assert isinstance(result.error_in_exec, RemoteError)
        assert result.error_in_exec.ename == "SystemExit"
        assert job.status is JobStatus.FAILED
    else:
        assert result.error_in_exec is None
        assert job.status is JobStatus.COMPLETED
    [row] = ledger_rows(burst_home)
    assert row.status == job.status.value


@pytest.mark.parametrize(("body", "status"), [
    ("import os\nos._exit(5)", "5"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "-9"),
])
def test_an_exit_without_a_python_exception_still_fails_the_cell(ip: Any, burst_home: Path, body: str,
                                                                 status: str) -> None:
    result, _ = run_cell(ip, cell("", "print('ran', flush=True)\n" + body))
    assert f"exited with status {status}" in usage_line(result)
    assert last_job().status is JobStatus.FAILED
    assert_clean(burst_home)


# -- --push / --pull -----------------------------------------------------------------------------------------


def test_push_and_pull_plain_values(ip: Any) -> None:
    ip.user_ns.update(lr=0.5, names=["a", "b"], cfg={"depth": 3})
    result, streams = run_cell(ip, cell("--push lr,names,cfg --pull loss,joined,cfg", """
        loss = lr * 2
        joined = "+".join(names)
        cfg["depth"] += 1
    """))
    assert result.error_in_exec is None, streams.text()
    assert ip.user_ns["loss"] == 1.0
    assert ip.user_ns["joined"] == "a+b"
    assert ip.user_ns["cfg"] == {"depth": 4}


def test_push_and_pull_numpy_arrays(ip: Any) -> None:
    np = pytest.importorskip("numpy")
    ip.user_ns["weights"] = np.arange(12, dtype=np.float32).reshape(3, 4)
    result, streams = run_cell(ip, cell("--push weights --pull doubled", "doubled = weights * 2"))
    assert result.error_in_exec is None, streams.text()
    doubled = ip.user_ns["doubled"]
    assert doubled.dtype == np.float32 and doubled.shape == (3, 4)
    assert np.array_equal(doubled, np.arange(12, dtype=np.float32).reshape(3, 4) * 2)


def test_push_a_lambda_and_a_notebook_function_pull_a_remote_function(ip: Any) -> None:
    pytest.importorskip("cloudpickle")
    setup = ip.run_cell("scale = 3\nadd_one = lambda x: x + 1\ndef triple(x):\n    return x * scale\n")
    assert setup.error_in_exec is None
    result, streams = run_cell(ip, cell("--push add_one,triple,scale --pull total,times_ten", """
        total = add_one(1) + triple(2)
        def times_ten(x):
            return x * 10
    """))
    assert result.error_in_exec is None, streams.text()
    assert ip.user_ns["total"] == 8
    assert ip.user_ns["times_ten"](4) == 40


def test_pulled_values_land_even_when_the_cell_raises_after_assigning_them(ip: Any) -> None:
    result, _ = run_cell(ip, cell("--pull early,late", """
        early = [1, 2, 3]
        raise KeyError("after early")
        late = 1
    """))
    assert isinstance(result.error_in_exec, RemoteError)
    assert ip.user_ns["early"] == [1, 2, 3]
    assert "late" not in ip.user_ns


def test_a_missing_push_variable_is_one_line_naming_it_and_nothing_is_rented(ip: Any, burst_home: Path) -> None:
    ip.user_ns.pop("not_defined_here", None)
    result, _ = run_cell(ip, cell("--push not_defined_here", "print(1)"))
    line = usage_line(result)
    assert "not_defined_here" in line and "--push" in line
    assert local_jobdirs(burst_home) == [] and state_row_count(burst_home) == 0
    assert ledger_rows(burst_home) == []


@pytest.mark.parametrize("make", ["lock", "write_file"])
def test_an_unpicklable_push_names_the_variable(ip: Any, burst_home: Path, tmp_path: Path, make: str) -> None:
    import threading

    value = threading.Lock() if make == "lock" else (tmp_path / "log.txt").open("w")
    try:
        ip.user_ns["handle"] = value
        result, _ = run_cell(ip, cell("--push handle", "print(handle)"))
        line = usage_line(result)
        assert "--push handle" in line and "cannot pickle" in line
    finally:
        if make == "write_file":
            value.close()  # type: ignore[union-attr]
    assert local_jobdirs(burst_home) == [] and state_row_count(burst_home) == 0


def test_pulling_a_name_the_cell_never_assigns_fails_before_running(ip: Any, burst_home: Path) -> None:
    marker = Path("ran.txt").resolve()
    result, _ = run_cell(ip, cell("--pull never_set", f"open({str(marker)!r}, 'w').write('x')\nother = 1"))
    line = usage_line(result)
    assert "--pull never_set" in line and "never assigns" in line
    assert not marker.exists()
    assert local_jobdirs(burst_home) == [] and state_row_count(burst_home) == 0


def test_pulling_a_value_that_cannot_be_pickled_remotely_names_it(ip: Any, burst_home: Path) -> None:
    result, _ = run_cell(ip, cell("--pull gen,fine", """
        gen = (i for i in range(3))
        fine = 7
    """))
    line = usage_line(result)
    assert "--pull gen" in line and "cannot pickle" in line
    assert ip.user_ns["fine"] == 7  # the values that did travel still land
    assert_clean(burst_home)


def test_a_remote_pull_that_never_happened_at_run_time_names_it(ip: Any) -> None:
    result, _ = run_cell(ip, cell("--pull maybe", """
        if False:
            maybe = 1
    """))
    line = usage_line(result)
    assert "--pull maybe" in line and "did not define" in line


# -- config and help -----------------------------------------------------------------------------------------


@pytest.fixture
def clean_config(ip: Any) -> Any:
    yield ip
    ip.config.pop("BurstMagics", None)  # %config writes into the shared shell's config


def test_config_magic_sets_the_default_cap(clean_config: Any, burst_home: Path) -> None:
    ip = clean_config
    ip.run_line_magic("config", "BurstMagics.max_cost = 5")
    result, streams = run_cell(ip, cell("--rate 1", "print('capped')"))
    assert result.error_in_exec is None, streams.text()
    job = last_job()
    [queued] = [e for e in job.events if e.type is EventType.QUEUED]
    assert queued.max_cost_usd == Decimal(5)
    [row] = ledger_rows(burst_home)
    assert row.reserved_usd == Decimal(5)
    # An explicit option still wins over %config.
    result, _ = run_cell(ip, cell("--max-cost 2 --rate 1", "pass"))
    assert result.error_in_exec is None
    assert last_job().plan.cap_usd == Decimal(2)


def test_config_magic_takes_an_option_s_name_and_its_older_spelling_but_not_both(clean_config: Any,
                                                                                 burst_home: Path) -> None:
    ip = clean_config
    ip.run_line_magic("config", "BurstMagics.lease = 30")  # as the option is named: --lease
    result, streams = run_cell(ip, cell("", "print('ok')"))
    assert result.error_in_exec is None, streams.text()
    assert last_job().plan.spec.lease_seconds == 30
    ip.run_line_magic("config", "BurstMagics.lease_seconds = 40")  # the config file's older spelling
    result, _ = run_cell(ip, cell("", "print('never')"))
    assert usage_line(result) == "BurstMagics.lease_seconds and BurstMagics.lease are the same setting; keep one"
    assert local_jobdirs(burst_home) == []


def test_pyproject_tool_burst_sets_defaults(ip: Any, burst_home: Path, tmp_path: Path) -> None:
    from burst_jupyter.session import Session

    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.burst]\nmax-cost = 3\n'
                                             'rate = "0.25"\nprovider = "local"\n')
    Session.reset_current()  # settings are read when the session starts
    result, streams = run_cell(ip, cell("", "print('ok')"))
    assert result.error_in_exec is None, streams.text()
    job = last_job()
    assert job.plan.cap_usd == Decimal(3)
    [provisioned] = [e for e in job.events if e.type is EventType.PROVISIONED]
    assert provisioned.cost_per_hour_usd == Decimal("0.25")
    [row] = ledger_rows(burst_home)
    assert (row.reserved_usd, row.rate_usd_per_hour, row.provider) == (Decimal(3), Decimal("0.25"), "local")


def test_an_unknown_pyproject_key_is_one_line_with_a_suggestion(ip: Any, burst_home: Path,
                                                                tmp_path: Path) -> None:
    from burst_jupyter.session import Session

    (tmp_path / "pyproject.toml").write_text("[tool.burst]\nmax-cots = 3\n")
    Session.reset_current()
    result, _ = run_cell(ip, cell("", "print(1)"))
    line = usage_line(result)
    assert "max-cots" in line and "did you mean max-cost?" in line and "pyproject.toml" in line
    assert local_jobdirs(burst_home) == [] and state_row_count(burst_home) == 0
    # Loading the extension in that folder names the config problem too (not "the state store").
    Session.reset_current()
    with recorded() as streams:
        ip.run_line_magic("reload_ext", "burst_jupyter")
    assert "did you mean max-cost?" in streams.text() and "state store" not in streams.text()


def test_generated_help_lists_the_options(ip: Any) -> None:
    doc = ip.find_cell_magic("burst").__doc__
    for option in ("--provider", "--gpu", "--max-cost", "--mount", "--push", "--pull", "--host", "--background",
                   "--rate", "--max-duration", "LOCAL:REMOTE[:ro|:rw]"):
        assert option in doc, option
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        ip.run_cell("%%burst?\n", store_history=False)
    assert "--max-cost" in captured.stdout


def test_state_row_records_the_whole_life(ip: Any, burst_home: Path) -> None:
    result, _ = run_cell(ip, cell("--name tracked", "print(1)"))
    assert result.error_in_exec is None
    job = last_job()
    row = state_row(burst_home, job.id)
    assert row is not None and row.state == "terminated" and row.instance_id == job.id
    assert row.provider == "local"


def test_output_is_written_as_the_cells_own_streams_not_the_test_runners(ip: Any) -> None:
    saved = sys.stdout
    result, streams = run_cell(ip, cell("", "print('hello')"))
    assert sys.stdout is saved
    assert result.error_in_exec is None
    assert streams.lines() == [("stdout", "hello")]
