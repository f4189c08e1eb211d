"""Real ipykernels for the tests: a kernelspec for this very interpreter, kernels with their own BURST_HOME,
IOPub collection, and checks that a job left nothing behind.

Everything here reads real state: IOPub and shell messages, ``/proc``, the local provider's job folders under
``BURST_HOME/local``, the state store and the ledger. Waits poll with generous deadlines; nothing asserts a
duration.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any, TypeVar

import pytest
from burst_checks import ledger_rows, live_instances, local_jobdirs, state_row
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from burst_jupyter.budget import LedgerRow

T = TypeVar("T")

def start_writer(kernel: Kernel, burst_home: Path, line: str, *, steps: int, background: bool) -> tuple[str, int]:
    """Start :func:`writer_cell` under ``line`` (a ``%%burst`` line mounting out/ rw); return the job id and how
    many files it reported written (at least 3)."""
    cell = kernel.submit(f"{line}{' --background' if background else ''}\n{writer_cell(steps)}")
    kernel.pump_until(lambda: "wrote 2\n" in cell.text("stdout"), timeout=60, what="the job's first files")
    if background:
        kernel.finish(cell)
    (job,) = wait_for(lambda: live_instances(burst_home), timeout=10, what="the job's state row")
    return job.job_id, cell.text("stdout").count("wrote ")


def writer_cell(steps: int) -> str:
    """One file per step into the rw mount out/, and a line saying so; a stop must reach it as KeyboardInterrupt
    (not as a kill), which it records in the mount too. Ends by itself after ``steps`` tenths of a second."""
    return f"""\
import time
try:
    for i in range({steps}):
        with open(f"out/f{{i}}.txt", "w") as f:
            f.write(str(i))
        print("wrote", i, flush=True)
        time.sleep(0.1)
except KeyboardInterrupt:
    with open("out/stopped.txt", "w") as f:
        f.write("KeyboardInterrupt")
    raise
"""


KERNEL_NAME = "python3"  # the name the notebooks ask for; resolved to this interpreter by kernel_specs()


def kernel_specs(root: Path) -> KernelSpecManager:
    """A kernelspec named ``python3`` that starts ``sys.executable`` (the venv running the tests), and a spec
    manager that looks nowhere else, so no other Python on PATH or in ~/.local can answer."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (burst tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(root / "kernels")], ensure_native_kernel=False)


def kernel_env(burst_home: Path, tmp: Path) -> dict[str, str]:
    """The kernel's environment: this one, plus its own BURST_HOME and an IPython dir of its own."""
    ipython_dir = tmp / "ipython"
    ipython_dir.mkdir(exist_ok=True)
    return {**os.environ, "BURST_HOME": str(burst_home), "IPYTHONDIR": str(ipython_dir),
            "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def kernel_manager(tmp: Path) -> KernelManager:
    """A manager for the test kernelspec, with its connection file in ``tmp`` (not the user's runtime dir)."""
    runtime = tmp / "runtime"
    runtime.mkdir(exist_ok=True)
    n = len(list(runtime.iterdir()))
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs(tmp),
                         connection_file=str(runtime / f"kernel-{os.getpid()}-{n}.json"))


@dataclass
class Execution:
    """One execute_request: its msg_id, the IOPub messages whose parent it is, and the reply."""

    msg_id: str
    iopub: list[dict[str, Any]] = field(default_factory=list)
    reply: dict[str, Any] | None = None

    def streams(self, name: str | None = None) -> list[tuple[str, str]]:
        return [(m["content"]["name"], m["content"]["text"]) for m in self.iopub
                if m["msg_type"] == "stream" and name in (None, m["content"]["name"])]

    def text(self, name: str | None = None) -> str:
        return "".join(t for _, t in self.streams(name))

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        return [m for m in self.iopub if m["msg_type"] in types]

    @property
    def status(self) -> str | None:
        return None if self.reply is None else str(self.reply["content"]["status"])


class Kernel:
    """A started kernel and a blocking client; IOPub messages are read by whoever asks and filed by parent."""

    def __init__(self, tmp: Path, *, burst_home: Path, cwd: Path) -> None:
        self.km = kernel_manager(tmp)
        self.km.start_kernel(env=kernel_env(burst_home, tmp), cwd=str(cwd))
        self.kc: BlockingKernelClient = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.all_iopub: list[dict[str, Any]] = []  # every IOPub message, in arrival order
        self._executions: dict[str, Execution] = {}

    # -- messages --------------------------------------------------------------------------------------------

    def submit(self, code: str) -> Execution:
        """Send an execute_request and return at once."""
        execution = Execution(self.kc.execute(code, allow_stdin=False))
        self._executions[execution.msg_id] = execution
        return execution

    def pump(self, timeout: float = 0.1) -> bool:
        """Read what has arrived on IOPub and shell; False if nothing came within ``timeout``."""
        got = False
        with contextlib.suppress(Empty):
            while True:
                msg = self.kc.get_iopub_msg(timeout=timeout if not got else 0)
                got = True
                self.all_iopub.append(msg)
                execution = self._executions.get(msg["parent_header"].get("msg_id"))
                if execution is not None:
                    execution.iopub.append(msg)
        with contextlib.suppress(Empty):
            while True:
                reply = self.kc.get_shell_msg(timeout=0)
                got = True
                execution = self._executions.get(reply["parent_header"].get("msg_id"))
                if execution is not None:
                    execution.reply = reply
        return got

    def pump_until(self, predicate: Callable[[], T], *, timeout: float, what: str) -> T:
        return wait_for(predicate, timeout=timeout, what=what, between=self.pump)

    def finish(self, execution: Execution, *, timeout: float = 60) -> Execution:
        """Wait for the reply and the idle status of ``execution``."""

        def done() -> bool:
            idle = any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                       for m in execution.iopub)
            return execution.reply is not None and idle

        self.pump_until(done, timeout=timeout, what=f"execute_reply of {execution.msg_id}")
        return execution

    def run(self, code: str, *, timeout: float = 60) -> Execution:
        return self.finish(self.submit(code), timeout=timeout)

    def run_ok(self, code: str, *, timeout: float = 60) -> Execution:
        execution = self.run(code, timeout=timeout)
        errors = execution.of_type("error")
        assert execution.status == "ok", "\n".join("\n".join(m["content"]["traceback"]) for m in errors)
        return execution

    # -- ending ----------------------------------------------------------------------------------------------

    def wait_dead(self, timeout: float = 30) -> None:
        """Until the kernel process is gone and reaped (a zombie would still look alive to the state store)."""
        wait_for(lambda: not self.km.is_alive(), timeout=timeout, what="the kernel process to exit")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
        with contextlib.suppress(Exception):
            self.km.cleanup_resources()


def wait_for(predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.1,
             between: Callable[[], object] | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), failing after a generous ``timeout``;
    ``between`` runs between polls (default: sleep ``interval``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        if between is not None:
            between()
        else:
            time.sleep(interval)


# -- what a job leaves behind ----------------------------------------------------------------------------------


def ledger_row(burst_home: Path, job_id: str) -> LedgerRow | None:
    """The job's last attempt's row (how it ended)."""
    return max((r for r in ledger_rows(burst_home) if r.job_id == job_id), key=lambda r: r.attempt, default=None)


def local_job_dirs(burst_home: Path) -> list[Path]:
    return [burst_home / "local" / name for name in local_jobdirs(burst_home)]


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process (zombies excluded) whose command line contains ``text``: the
    agent's ``supervise JOBDIR`` and ``cell JOBDIR``, its ``attach``/``run`` front commands."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append((int(entry.name), cmdline.strip()))
    return found


def kill_processes_mentioning(text: str) -> None:
    """Test clean-up only: make sure nothing a failed test started keeps running."""
    for pid, _ in processes_mentioning(text):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class Leftovers:
    job_dirs: list[Path]
    processes: list[tuple[int, str]]
    state: str | None
    ledger: LedgerRow | None

    @property
    def clean(self) -> bool:
        return not self.job_dirs and not self.processes and self.state == "terminated" and self.ledger is not None


def leftovers(burst_home: Path, job_id: str) -> Leftovers:
    jobdir = burst_home / "local" / job_id
    return Leftovers(
        job_dirs=local_job_dirs(burst_home),
        processes=processes_mentioning(str(jobdir)),
        state=getattr(state_row(burst_home, job_id), "state", None),
        ledger=ledger_row(burst_home, job_id),
    )


def wait_until_clean(burst_home: Path, job_id: str, *, timeout: float = 45) -> Leftovers:
    """Poll until the job's folder is gone, none of its processes runs, its state row says terminated and the
    ledger has its row; on timeout, fail showing what is still there."""
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers(burst_home, job_id)
        if found.clean:
            return found
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()}" for p in sorted((burst_home / "logs").glob("*.log"))) \
                if (burst_home / "logs").is_dir() else ""
            raise AssertionError(f"job {job_id} not cleaned up after {timeout:.0f} s: {found}{logs}")
        time.sleep(0.2)


@pytest.fixture
def start_kernel(tmp_path: Path, burst_home: Path, work: Path) -> Iterator[Callable[[], Kernel]]:
    """Start kernels with the extension loaded (their own BURST_HOME, in ``work``); closed, and what a failed test
    left running there killed, at the end."""
    started: list[Kernel] = []

    def start() -> Kernel:
        kernel = Kernel(tmp_path, burst_home=burst_home, cwd=work)
        started.append(kernel)
        kernel.run_ok("%load_ext burst_jupyter")
        return kernel

    yield start
    for kernel in started:
        kernel.close()
    kill_processes_mentioning(str(burst_home))  # only what a failed test left running
