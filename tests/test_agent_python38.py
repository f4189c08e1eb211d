"""The agent runs on every Python it accepts (3.8 and later): an instance's image decides which one it finds.

Two checks: the agent's source (and the boot watchdog's) names no library call newer than 3.8 (always; a list of
the ones that were tempting), and, where a Python 3.8 is on this machine (pyenv's, or ``python3.8``), a cell, a
--pull and a kept machine's cells really run under it. os.waitstatus_to_exitcode (3.9) once made every job on a
3.8 instance end as "the agent on the instance died" (found 2026-12-06).
"""

from __future__ import annotations

import ast
import glob
import shutil
from pathlib import Path

import pytest

import burst_jupyter as burst
from burst_jupyter import JobSpec, JobStatus, RemoteError
from burst_jupyter.agent import __file__ as AGENT_FILE

pytestmark = pytest.mark.timeout(90)

#: Attributes added after Python 3.8 that a stdlib-only agent might reach for.
NEWER_THAN_38 = {"waitstatus_to_exitcode", "removeprefix", "removesuffix", "send_fds", "recv_fds", "pidfd_open",
                 "is_relative_to", "lcm", "randbytes", "bit_count", "pairwise", "batched", "to_thread"}


@pytest.mark.parametrize("what", ["agent", "boot watchdog"])
def test_what_runs_on_the_instance_names_nothing_newer_than_python_38(what: str) -> None:
    from burst_jupyter.providers import _boot_watchdog

    source = Path(AGENT_FILE).read_text(encoding="utf-8") if what == "agent" else _boot_watchdog._SOURCE
    tree = ast.parse(source)
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert used & NEWER_THAN_38 == set()
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Match)]  # 3.10 syntax
    assert not [k for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords
                if k.arg == "strict"]  # zip(..., strict=) is 3.10
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                and isinstance(n.left, ast.Dict)]  # dict | dict is 3.9


def python38() -> str | None:
    found = sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.8.*/bin/python3.8")))
    return found[-1] if found else shutil.which("python3.8")


@pytest.mark.skipif(python38() is None, reason="no Python 3.8 on this machine (pyenv or python3.8)")
def test_cells_and_a_kept_machine_run_under_python_38(burst_home: Path) -> None:
    py = python38()
    result = burst.run(JobSpec(cell="import sys\nx = sys.version_info[:2]", provider="local", remote_python=py,
                               pull=["x"]), namespace={})
    assert result.values == {"x": (3, 8)}
    burst.up(provider="local", remote_python=py, max_cost_usd="1")
    burst.run(JobSpec(cell="y = 41"), namespace={})
    assert repr(burst.run(JobSpec(cell="y + 1"), namespace={}).result) == "42"
    with pytest.raises(RemoteError, match="signal 9"):
        burst.run(JobSpec(cell="import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"), namespace={})
    assert repr(burst.run(JobSpec(cell="'y' in globals()"), namespace={}).result) == "False"
    [down] = burst.down()
    assert down.status is JobStatus.COMPLETED
