"""Fixtures every test shares: an isolated burst home, a fresh Session, and a real IPython shell.

No test touches the user's real ledger or config: BURST_HOME and BURST_CONFIG point into tmp_path. Tests that
use ~ (remote homes, ~/.ssh) set HOME themselves (tests/ssh_boxes.py gives each SSH test its own).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/sshd.py: a real OpenSSH sshd on loopback (fixtures sshd_server and friends), for every SSH test;
# tests/marketplaces.py: the three provider fakes, served and configured (fixture markets);
# tests/fault_figures.py: the fault suite's fault_ledger fixture and its table at the end of the run;
# tests/kernels.py: real ipykernels (fixture start_kernel).
pytest_plugins = ("sshd", "marketplaces", "fault_figures", "kernels")


@pytest.fixture(autouse=True)
def burst_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "burst-home"
    monkeypatch.setenv("BURST_HOME", str(home))
    monkeypatch.setenv("BURST_CONFIG", str(tmp_path / "no-user-config.toml"))
    monkeypatch.chdir(tmp_path)
    yield home
    from burst_jupyter.session import Session

    Session.reset_current()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working folder for kernels and CLI processes, with an empty rw mount folder out/ in it."""
    folder = tmp_path / "work"
    (folder / "out").mkdir(parents=True)
    return folder


@pytest.fixture
def dummy_comm() -> Iterator[None]:
    """ipywidgets' test comm: widgets open without a kernel and record every message they would send."""
    utils = pytest.importorskip("ipywidgets.widgets.tests.utils")
    utils.setup_test_comm()
    yield
    utils.teardown_test_comm()


@pytest.fixture
def ip() -> Iterator[object]:
    """A real IPython InteractiveShell with the extension loaded (jupysql's TestingShell idea, with IPython's
    own globalipapp). History is off to avoid its SQLite thread and 'too many open files'."""
    from IPython.testing import globalipapp

    # start_ipython() builds the shell once per process and returns None on later calls.
    shell = globalipapp.start_ipython() or globalipapp.get_ipython()
    assert shell is not None
    shell.history_manager.enabled = False
    shell.run_line_magic("load_ext", "burst_jupyter")
    yield shell
    shell.run_line_magic("unload_ext", "burst_jupyter")
    # reset(), not user_ns.clear(): the next test needs the shell's own names (_oh, _ih, In, Out) back.
    shell.reset(new_session=False)
    os.environ.pop("BURST_TEST_MARK", None)
