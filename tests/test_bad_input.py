"""Bad input to %%burst: each case is one clear UsageError line, nothing rented, nothing charged.

"Nothing rented" is read from real state: no job folder of the local provider, no row in the state store, no
open reservation, and the ledger (seeded with one row) unchanged. SSH cases live in the SSH tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from burst_checks import (
    ledger_rows,
    live_instances,
    local_jobdirs,
    open_reservations,
    run_cell,
    seed_ledger,
    state_row_count,
    usage_line,
)
from IPython.core.error import UsageError
from marketplaces import Markets

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def seeded(burst_home: Path) -> list[Any]:
    seed_ledger(burst_home)
    return ledger_rows(burst_home)


def refused(ip: Any, home: Path, before: list[Any], options: str, body: str = "open('ran', 'w').write('x')") -> str:
    """Run a %%burst cell that must be refused; return its one-line message after checking nothing happened."""
    result, streams = run_cell(ip, f"%%burst {options}\n{body}\n")
    line = usage_line(result)
    assert not Path("ran").exists(), "the cell ran"
    assert local_jobdirs(home) == []
    assert state_row_count(home) == 0 and live_instances(home) == []
    assert open_reservations(home) == []
    assert ledger_rows(home) == before
    assert "Traceback" not in streams.text(ours=True)
    return line


def test_unknown_provider(ip: Any, burst_home: Path, seeded: list[Any]) -> None:
    line = refused(ip, burst_home, seeded, "--provider locl")
    assert "unknown provider 'locl'" in line and "did you mean local" in line
    line = refused(ip, burst_home, seeded, "--provider azure")
    assert "unknown provider 'azure'" in line and "local" in line and "ssh" in line


@pytest.mark.parametrize(("gpu", "suggestion"), [("RTX4090", "RTX_4090"), ("H10O", "H100"), ("a100-80", "A100_80GB")])
def test_unknown_gpu_name_lists_close_matches(ip: Any, burst_home: Path, seeded: list[Any], gpu: str,
                                              suggestion: str) -> None:
    line = refused(ip, burst_home, seeded, f"--gpu {gpu}")
    assert f"unknown GPU {gpu!r}" in line and "did you mean" in line and suggestion in line


@pytest.mark.parametrize(("value", "expected"), [
    ("-1", "cannot be negative"),
    ("-0.01", "cannot be negative"),
    ("abc", "must be a number of USD, not 'abc'"),
    ("1e999999", "too large"),
    ("1e15", "too large"),
    ("nan", "finite"),
])
def test_bad_max_cost(ip: Any, burst_home: Path, seeded: list[Any], value: str, expected: str) -> None:
    line = refused(ip, burst_home, seeded, f"--max-cost {value}")
    assert "--max-cost" in line and expected in line


def test_bad_rate(ip: Any, burst_home: Path, seeded: list[Any]) -> None:
    line = refused(ip, burst_home, seeded, "--rate lots")
    assert "--rate" in line and "lots" in line


def test_a_cap_too_small_to_start_and_stop_a_job(ip: Any, burst_home: Path, seeded: list[Any]) -> None:
    line = refused(ip, burst_home, seeded, "--rate 3600 --max-cost 0.5")
    assert "--max-cost" in line and "too little" in line


@pytest.mark.parametrize(("spec", "expected"), [
    ("nocolon", "must look like LOCAL:REMOTE"),
    ("./data:/x:zz", "mode must be ro or rw, not 'zz'"),
    ("./data:", "must look like LOCAL:REMOTE"),
    (":/remote", "must look like LOCAL:REMOTE"),
    ("./data:/", "whole machine"),
    ("./data:../up", "may not contain '..'"),
])
def test_malformed_mount_spec(ip: Any, burst_home: Path, seeded: list[Any], tmp_path: Path, spec: str,
                              expected: str) -> None:
    (tmp_path / "data").mkdir()
    line = refused(ip, burst_home, seeded, f"--mount {spec}")
    assert expected in line


def test_two_mounts_on_one_remote_path(ip: Any, burst_home: Path, seeded: list[Any], tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    line = refused(ip, burst_home, seeded, "--mount ./a:same --mount ./b:same:rw")
    assert "share a remote path" in line


@pytest.mark.parametrize("spec", ["./missing:data:ro", "./missing/deeper:data:rw"])
def test_missing_local_mount_path(ip: Any, burst_home: Path, seeded: list[Any], tmp_path: Path, spec: str) -> None:
    line = refused(ip, burst_home, seeded, f"--mount {spec}")
    assert "does not exist" in line and "missing" in line
    assert not (tmp_path / "missing").exists()


def test_a_gpu_this_machine_does_not_have(ip: Any, burst_home: Path, seeded: list[Any]) -> None:
    from burst_jupyter.providers.catalog import CATALOG
    from burst_jupyter.providers.local import local_gpus

    have = [name for name, _ in local_gpus()]
    wanted = next(key for key, model in CATALOG.items() if not any(model.matches_smi(name) for name in have))
    line = refused(ip, burst_home, seeded, f"--gpu {wanted} --gpus 1")
    assert "this machine has" in line and wanted in line
    assert (", ".join(have) or "no NVIDIA GPU") in line


def test_more_gpus_than_this_machine_has(ip: Any, burst_home: Path, seeded: list[Any]) -> None:
    line = refused(ip, burst_home, seeded, "--gpu ANY --gpus 16")
    assert "this machine has" in line and "16 x GPU" in line


def test_a_remote_python_too_old_for_the_agent(ip: Any, burst_home: Path, seeded: list[Any],
                                               tmp_path: Path) -> None:
    """The agent's first line refuses Python < 3.8 before it makes anything: the job fails in one line and
    nothing is left to end (the terminate must not wait for a job folder that never existed)."""
    old = tmp_path / "python3.6"
    old.write_text("#!/bin/sh\necho 'burst-agent: needs Python >= 3.8, found 3.6.9' >&2\nexit 1\n")
    old.chmod(0o755)
    result, _ = run_cell(ip, f"%%burst --provider local --python {old}\nopen('ran', 'w').write('x')\n")
    line = usage_line(result)
    assert "needs Python >= 3.8, found 3.6.9" in line
    assert not Path("ran").exists()
    assert local_jobdirs(burst_home) == [] and live_instances(burst_home) == []
    assert open_reservations(burst_home) == [] and ledger_rows(burst_home) == seeded


def test_image_needs_a_marketplace_provider(ip: Any, burst_home: Path, seeded: list[Any]) -> None:
    line = refused(ip, burst_home, seeded, "--provider local --image pytorch/pytorch:latest")
    assert "--image" in line and "local" in line


def test_a_cell_with_a_syntax_error(ip: Any, burst_home: Path, seeded: list[Any]) -> None:
    line = refused(ip, burst_home, seeded, "--pull x", "x = 1\ndef broken(:\n    pass")
    assert "syntax error at line 2" in line
    line = refused(ip, burst_home, seeded, "", "print('fine')\nfor\n")
    assert "syntax error at line 2" in line


@pytest.mark.parametrize(("options", "expected"), [
    ("--push 1abc", "'1abc' is not a Python variable name"),
    ("--pull a-b", "'a-b' is not a Python variable name"),
    ("--max-duration 0", "--max-duration: must be at least 1 (got 0)"),
    ("--max-duration 100000", "--max-duration: must be at most 720 (got 100000)"),
    ("--gpus -1", "gpus"),
    ("--no-such-option 3", "unrecognized arguments"),
    ("--max-duration soon", "invalid int value"),
    ("--host gpu1 --provider local", "--host is for provider ssh"),
])
def test_other_bad_options(ip: Any, burst_home: Path, seeded: list[Any], options: str, expected: str) -> None:
    line = refused(ip, burst_home, seeded, options)
    assert expected in line


def test_an_empty_line_magic_command_is_refused_in_one_line(ip: Any) -> None:
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="unknown command"):
        ip.run_line_magic("burst", "ledgr")
    with pytest.raises(UsageError, match="needs an amount"):
        ip.run_line_magic("burst", "budget --daily")
    with pytest.raises(UsageError, match="cannot be negative"):
        ip.run_line_magic("burst", "budget --daily -5")


@pytest.mark.parametrize(("options", "expected"), [
    ("--retries -1", "--retries: must be at least 0 (got -1)"),
    ("--retries 11", "--retries: must be at most 10 (got 11)"),
    ("--sync-every 2", "--sync-every: must be at least 5 (got 2)"),
    ("--lease -5", "--lease: must be at least 0 (got -5)"),
])
def test_bad_retries_sync_every_or_lease(ip: Any, burst_home: Path, seeded: list[Any], options: str,
                                         expected: str) -> None:
    assert expected in refused(ip, burst_home, seeded, f"--provider local --max-cost 1 {options}")


def test_cleanup_refuses_an_unknown_option(ip: Any) -> None:
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="unknown option '--force'"):
        ip.run_line_magic("burst", "cleanup --force")


@pytest.mark.parametrize(("options", "expected"), [
    ("--gpus 0", "--gpus: must be 1 to 16, not 0 (a job that needs no GPU leaves out --gpu and --gpus)"),
    ("--gpu ANY --gpus 0", "--gpus: must be 1 to 16, not 0"),
    ("--gpus -2", "--gpus: must be 1 to 16, not -2"),
    ("--gpus 17", "--gpus: must be 1 to 16, not 17"),
    ("--provision-timeout inf", "--provision-timeout: Input should be a finite number (got inf)"),
    ("--provision-timeout nan", "--provision-timeout: Input should be a finite number (got nan)"),
    ("--provision-timeout 0", "--provision-timeout: must be more than 0"),
    ("--min-reliability nan", "--min-reliability: Input should be a finite number (got nan)"),
    ("--min-reliability -0.5", "--min-reliability: must be at least 0 (got -0.5)"),
    ("--memory 0", "--memory: must be at least 1 (got 0)"),
])
def test_a_count_or_limit_of_zero_negative_or_infinite(ip: Any, burst_home: Path, seeded: list[Any], options: str,
                                                       expected: str) -> None:
    assert refused(ip, burst_home, seeded, f"--provider local --max-cost 1 {options}").startswith(expected)


@pytest.mark.parametrize("provider", ["vast", "thunder", "lambda"])
def test_zero_gpus_rents_nothing_at_a_marketplace(ip: Any, burst_home: Path, seeded: list[Any], markets: Markets,
                                                  provider: str) -> None:
    """Vast, Thunder and Lambda would round 0 up and rent one GPU."""
    line = refused(ip, burst_home, seeded, f"--provider {provider} --gpu ANY --gpus 0 --max-cost 1")
    assert line.startswith("--gpus: must be 1 to 16, not 0")
    with pytest.raises(UsageError, match=r"^--gpus must be 1 to 16, not 0"):
        ip.run_line_magic("burst", "offers --gpus 0")
    assert markets.creates() == 0


def test_a_dry_run_writes_nothing_in_your_folders(ip: Any, burst_home: Path, seeded: list[Any],
                                                 tmp_path: Path) -> None:
    result, streams = run_cell(ip, "%%burst --provider local --max-cost 1 --dry-run --mount ./new-out:out:rw\n"
                                   "print('must not run')\n")
    assert result.error_in_exec is None, streams.text()
    assert "nothing was rented (--dry-run)" in repr(result.result)
    assert not (tmp_path / "new-out").exists()
    assert local_jobdirs(burst_home) == [] and state_row_count(burst_home) == 0
    assert ledger_rows(burst_home) == seeded


@pytest.mark.parametrize("spec", [r"C:\Users\me\data:data:rw", "C:/Users/me/data:data", r"d:\runs:out:rw"])
def test_a_windows_path_is_not_a_folder_named_by_its_drive_letter(ip: Any, burst_home: Path, seeded: list[Any],
                                                                  tmp_path: Path, spec: str) -> None:
    line = refused(ip, burst_home, seeded, f"--provider local --max-cost 1 --mount {spec}")
    assert "is a Windows path and this machine is not Windows" in line
    assert sorted(p.name for p in tmp_path.iterdir() if len(p.name) == 1) == []  # no ./C, no ./d
