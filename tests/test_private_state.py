"""The state folder (BURST_HOME) is the user's alone (issue 9): the ledger, every job's endpoint and output log
and its keys sit there, so the folder is 0700 and its files 0600 whatever the umask, and an older folder made
wider is tightened. Real ``burst`` processes run under umask 000, the most permissive there is.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from burst_checks import ledger_rows
from marketplaces import Markets

pytestmark = pytest.mark.timeout(60)

UMASK_000 = "import os, sys; os.umask(0); "


def burst(*argv: str) -> subprocess.CompletedProcess[str]:
    """The ``burst`` command in its own process, under umask 000."""
    code = UMASK_000 + "from burst_jupyter.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60,
                          check=False)


def wide(home: Path) -> dict[str, str]:
    """Every path under ``home`` (and ``home`` itself) that group or others may use, with its mode."""
    found = {}
    for path in [home, *home.rglob("*")]:
        mode = os.lstat(path).st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            found[str(path.relative_to(home))] = oct(stat.S_IMODE(mode))
    return found


def test_the_state_folder_and_its_files_are_private_under_a_permissive_umask(burst_home: Path,
                                                                          tmp_path: Path) -> None:
    # What an older version left under a umask of 000: everything readable and writable by everyone.
    old_logs = burst_home / "logs" / "jobs"
    old_logs.mkdir(parents=True)
    (old_logs / "old-0123abcd.jsonl").write_text('{"type": "output", "text": "last week\'s secret"}\n')
    (burst_home / "install-id").write_text("burst-0123abcd\n")
    for path in (burst_home, burst_home / "logs", old_logs, old_logs / "old-0123abcd.jsonl",
                 burst_home / "install-id"):
        path.chmod(0o777)

    cell = tmp_path / "cell.py"
    cell.write_text("print('this output is nobody else\\'s business')\n")
    done = burst("submit", "--provider", "local", "--max-cost", "1", "--file", str(cell))
    assert done.returncode == 0, done.stderr
    assert burst("cleanup").returncode == 0  # the reconciliation log
    [row] = ledger_rows(burst_home)
    assert (burst_home / "logs" / "jobs" / f"{row.job_id}.jsonl").exists()

    # The database and the -wal and -shm SQLite makes beside it, while a connection holds them.
    probe = UMASK_000 + (
        "import json, os, sys; from pathlib import Path; from burst_jupyter.db import connect; "
        "p = Path(sys.argv[1]); c = connect(p); c.execute('CREATE TABLE IF NOT EXISTS t (x)'); "
        "c.execute('INSERT INTO t VALUES (1)'); "
        "print(json.dumps({n: oct(os.stat(str(p) + n).st_mode & 0o777) for n in ('', '-wal', '-shm')}))")
    modes = subprocess.run([sys.executable, "-c", probe, str(burst_home / "burst.sqlite3")], capture_output=True,
                           text=True, timeout=60, check=True)
    assert json.loads(modes.stdout) == {"": "0o600", "-wal": "0o600", "-shm": "0o600"}

    assert stat.S_IMODE(burst_home.stat().st_mode) == 0o700
    assert wide(burst_home) == {}


def test_a_new_state_folder_is_private_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = tmp_path / "not-yet" / "burst-home"
    monkeypatch.setenv("BURST_HOME", str(fresh))
    cell = tmp_path / "cell.py"
    cell.write_text("print('private')\n")
    done = burst("submit", "--provider", "local", "--max-cost", "1", "--file", str(cell))
    assert done.returncode == 0, done.stderr
    assert burst("cleanup").returncode == 0
    assert (fresh / "logs" / "jobs").is_dir() and (fresh / "burst.sqlite3").is_file()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert wide(fresh) == {}


def test_a_marketplace_job_leaves_nothing_readable(markets: Markets, burst_home: Path, tmp_path: Path) -> None:
    """Its SSH key, the instance's pinned host key and the handoff with the endpoint, under umask 000."""
    cell = tmp_path / "cell.py"
    cell.write_text("print('on a stranger\\'s machine')\n")
    done = burst("submit", "--provider", "vast", "--gpu", "ANY", "--max-cost", "1", "--file", str(cell))
    assert done.returncode == 0, done.stderr
    assert (burst_home / "keys").is_dir()
    assert wide(burst_home) == {}
