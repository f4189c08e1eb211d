"""A kept machine, agent side: one persistent Python process (the kernel) runs the cells sent to the machine.

Driven as the client drives it: ``AgentClient`` over the local runner starts a machine job (manifest
``"machine": {"idle_seconds": N}``) and cell jobs on it (``"on_machine": <its job directory>``), each with its
own job directory, event log, results and destroy. Real processes throughout: the kernel is killed, interrupted
and left idle for real.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import stat
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from burst_checks import wait_until
from kernels import processes_mentioning

from burst_jupyter import agent
from burst_jupyter.connections import Connections
from burst_jupyter.errors import RemoteSetupError
from burst_jupyter.providers.base import Endpoint
from burst_jupyter.remote import AgentClient, AgentStream, Record

pytestmark = pytest.mark.timeout(120)

SLACK = 30.0  # only turns a hang into a failure


def bundle(cell: str | None, files: dict[str, bytes] | None = None, *, raw: list[tarfile.TarInfo] | None = None,
           pushed: dict[str, object] | None = None) -> Any:
    """The upload tar as the client writes it: cell.py, values.pkl and each mount's files as m/<i>/REL."""

    def write(sink: IO[bytes]) -> None:
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            values = {name: pickle.dumps(value, protocol=4) for name, value in (pushed or {}).items()}
            entries = {"values.pkl": pickle.dumps(values, protocol=4), **({"cell.py": cell.encode()} if cell else {}),
                       **(files or {})}
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            for info in raw or []:
                tar.addfile(info, io.BytesIO(b"x" * info.size))
    return write


class Machine:
    """A machine job and the cells sent to it, on this machine (the local runner)."""

    def __init__(self, root: Path, *, idle: int = 0, mounts: list[Record] | None = None,
                 files: dict[str, bytes] | None = None, **fields: Any) -> None:
        self.root = root
        self.connections = Connections()
        self.jobdir = root / "machine-0a1b2c3d"
        self.client = self.agent(self.jobdir)
        manifest = {"job_id": self.jobdir.name, "tag": "t", "mounts": mounts or [], "pull": [], "command": None,
                    "lease_seconds": 600, "machine": {"idle_seconds": idle}, **fields}
        self.stream = self.client.start(manifest, bundle(None, files))
        self.cells = 0
        wait_until(lambda: (self.jobdir / agent.KERNEL_SOCKET).exists(), "the kernel to listen", limit=SLACK)

    def agent(self, jobdir: Path) -> AgentClient:
        return self.connections.agent(Endpoint(), sys.executable, str(jobdir))

    def submit(self, source: str, *, mounts: list[Record] | None = None, files: dict[str, bytes] | None = None,
               pull: list[str] | None = None, raw: list[tarfile.TarInfo] | None = None, lease: int = 600,
               pushed: dict[str, object] | None = None) -> Cell:
        self.cells += 1
        jobdir = self.root / f"cell{self.cells}-{self.cells:08x}"
        manifest = {"job_id": jobdir.name, "tag": "t", "mounts": mounts or [], "pull": pull or [], "command": None,
                    "lease_seconds": lease, "on_machine": str(self.jobdir)}
        client = self.agent(jobdir)
        return Cell(jobdir, client, client.start(manifest, bundle(source, files, raw=raw, pushed=pushed)))

    def run(self, source: str, **options: Any) -> Cell:
        cell = self.submit(source, **options)
        cell.finish()
        return cell

    def records(self) -> list[Record]:
        return [json.loads(line) for line in (self.jobdir / "events.jsonl").read_text().splitlines()]

    def kernel_pids(self) -> list[int]:
        return [r["pid"] for r in self.records() if r["k"] == agent.Kind.STARTED]

    def close(self) -> None:
        self.client.release()
        self.client.destroy()
        self.connections.close_all()


class Cell:
    def __init__(self, jobdir: Path, client: AgentClient, stream: AgentStream) -> None:
        self.jobdir, self.client, self.stream = jobdir, client, stream
        self.records: list[Record] = []
        self.results: dict[str, bytes] = {}

    def finish(self) -> None:
        self.records.extend(self.stream.records())
        self.results = self.stream.read_results(_members)
        assert self.client.destroy()

    @property
    def exit(self) -> Record:
        assert self.stream.exit is not None, self.records
        return self.stream.exit

    def out(self) -> str:
        return "".join(r["d"] for r in self.records if r["k"] == agent.Kind.OUT and r["s"] == "stdout")

    def value(self) -> str:
        (result,) = [r for r in self.records if r["k"] == agent.Kind.RESULT]
        return str(result["data"]["text/plain"])

    def error(self) -> Record:
        (error,) = [r for r in self.records if r["k"] == agent.Kind.ERROR]
        return error

    def kernel(self) -> int:
        (started,) = [r for r in self.records if r["k"] == agent.Kind.STARTED]
        assert "pid" not in started  # nothing a destroy of this job would kill: the process is the machine's
        return int(started["kernel"])


def _members(stream: IO[bytes]) -> dict[str, bytes]:
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        return {m.name: (tar.extractfile(m) or io.BytesIO()).read() for m in tar if m.isfile()}


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    m = Machine(tmp_path)
    yield m
    m.close()
    wait_until(lambda: not processes_mentioning(str(m.jobdir)), "the machine's processes to end", limit=SLACK)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- names persist ----------------------------------------------------------------------------------------------


def test_two_cells_share_their_names_in_one_kernel(machine: Machine) -> None:
    first = machine.run("import os\nx = 41\nprint('pid', os.getpid())\n")
    assert first.exit["rc"] == 0 and first.exit["reason"] == "ok", first.records
    second = machine.run("x + 1\n")
    assert second.exit["rc"] == 0, second.records
    assert second.value() == "42"
    assert first.kernel() == second.kernel() == int(first.out().split()[1])
    assert machine.kernel_pids() == [first.kernel()]  # the machine started one process, for both cells
    assert alive(first.kernel())
    # A cell's destroy removed its own directory and left the machine's process alone.
    assert not first.jobdir.exists() and not second.jobdir.exists()
    # Only the owner reaches the kernel: a socket file (not an abstract name) 0600 in a 0700 directory.
    sock = machine.jobdir / agent.KERNEL_SOCKET
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(machine.jobdir.stat().st_mode) == 0o700
    # The cell ran in the machine's work/, and its activity is what the idle limit reads.
    assert (machine.jobdir / agent.ACTIVITY).exists() and not (machine.jobdir / agent.BUSY).exists()


def test_a_cell_on_a_machine_pushes_pulls_displays_and_plots_as_a_one_off_cell_does(machine: Machine) -> None:
    first = machine.run("def scale(v):\n    return v * factor\n", pushed={"factor": 3})
    assert first.exit["rc"] == 0, first.records
    second = machine.run(
        "class Table:\n    def _repr_html_(self):\n        return '<table><tr><td>1</td></tr></table>'\n"
        "display(Table())\n"
        "import matplotlib.pyplot as plt\nplt.plot([1, 2])\n"
        "result = scale(14)\nresult\n", pull=["result"])
    assert second.value() == "42", second.records
    kinds = [r["k"] for r in second.records if r["k"] in (agent.Kind.DISPLAY, agent.Kind.RESULT)]
    assert kinds == [agent.Kind.DISPLAY, agent.Kind.RESULT, agent.Kind.DISPLAY]
    shown = [r["data"] for r in second.records if r["k"] == agent.Kind.DISPLAY]
    assert "<table>" in shown[0]["text/html"] and "image/png" in shown[1]  # the figure left open, after the value
    assert "values.out.pkl" in second.results
    # A traceback through a function an earlier cell defined shows that cell's line.
    third = machine.run("scale(None)\n", pushed={"factor": {}})
    tb = "\n".join(third.error()["tb"])
    assert third.error()["ename"] == "TypeError" and "return v * factor" in tb, tb


def test_a_long_job_directory_still_gets_its_socket(tmp_path: Path) -> None:
    """AF_UNIX paths hold ~107 bytes: the socket is bound and reached by a relative name."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    m = Machine(deep)
    try:
        assert len(str(m.jobdir / agent.KERNEL_SOCKET)) > 108
        assert m.run("y = 'deep'\ny\n").value() == "'deep'"
    finally:
        m.close()


def test_list_marks_cells_as_on_a_machine(machine: Machine) -> None:
    cell = machine.submit("import time\ntime.sleep(30)\n")
    wait_until(lambda: (machine.jobdir / agent.BUSY).exists(), "the cell to run", limit=SLACK)
    lines = {r["job_id"]: r for r in machine.agent(machine.root).list("t")}
    assert "on_machine" not in lines[machine.jobdir.name]  # the machine owns the instance
    assert lines[cell.jobdir.name]["on_machine"] == str(machine.jobdir)
    cell.client.stop("cancelled")
    cell.finish()
    assert cell.exit["reason"] == "cancelled"


# -- Ctrl-C, a dead kernel ---------------------------------------------------------------------------------------


def test_stop_interrupts_the_cell_and_the_kernel_lives_on(machine: Machine) -> None:
    machine.run("kept = 'still here'\n")
    cell = machine.submit("import time\nprint('looping', flush=True)\nwhile True:\n    time.sleep(0.1)\n")
    wait_until(lambda: (cell.jobdir / "events.jsonl").exists() and b"looping" in
               (cell.jobdir / "events.jsonl").read_bytes(), "the cell to loop", limit=SLACK)
    cell.client.stop("cancelled")
    cell.finish()
    assert cell.exit["rc"] == 130 and cell.exit["reason"] == "cancelled", cell.records
    assert cell.error()["ename"] == "KeyboardInterrupt"
    after = machine.run("kept\n")
    assert after.value() == "'still here'"
    # The interrupt itself ended the cell: an escalation (SIGTERM) would have ended the kernel too.
    assert after.kernel() == cell.kernel() and machine.kernel_pids() == [cell.kernel()]


def test_sigint_between_cells_does_not_end_the_kernel(machine: Machine) -> None:
    first = machine.run("n = 1\n")
    pid = first.kernel()
    for _ in range(3):
        os.kill(pid, signal.SIGINT)
        os.killpg(pid, signal.SIGINT)
    time.sleep(0.5)
    assert alive(pid)
    second = machine.run("n + 1\n")
    assert second.value() == "2" and second.kernel() == pid
    assert machine.kernel_pids() == [pid]


def test_a_killed_kernel_fails_its_cell_and_the_next_cell_gets_a_fresh_one(machine: Machine) -> None:
    machine.run("lost = 'soon'\n")
    dead = machine.run("import os\nprint('going', flush=True)\nos.kill(os.getpid(), 9)\n")
    assert dead.exit["rc"] == 1 and dead.exit["reason"] == "error", dead.records
    assert "going" in dead.out()
    error = dead.error()
    assert error["ename"] == agent.KERNEL_DIED and error["tb"] == []
    assert error["evalue"] == ("the remote Python process died (killed by signal 9, e.g. out of memory): what "
                               "earlier cells defined is lost; the next cell starts a fresh one")
    assert json.loads((machine.jobdir / agent.KERNEL_EXIT).read_text())["pid"] == dead.kernel()
    assert json.loads((machine.jobdir / agent.KERNEL_EXIT).read_text())["signal"] == 9
    fresh = machine.run("print('lost' in dir())\nimport os\nos.getpid()\n")
    assert fresh.exit["rc"] == 0 and fresh.out() == "False\n"
    assert fresh.kernel() != dead.kernel() and fresh.value() == str(fresh.kernel())
    notes = [r["m"] for r in machine.records() if r["k"] == agent.Kind.NOTE]
    assert "the remote Python process ended (killed by signal 9); a fresh one starts" in notes
    assert machine.kernel_pids() == [dead.kernel(), fresh.kernel()]


def test_a_kernel_that_exits_mid_cell_is_reported_with_its_status(machine: Machine) -> None:
    dead = machine.run("import os\nos._exit(3)\n")
    assert dead.error()["ename"] == agent.KERNEL_DIED and "(exited with status 3)" in dead.error()["evalue"]
    assert machine.run("1 + 1\n").value() == "2"


def test_a_cell_stopped_while_it_waits_for_the_kernel_never_runs(machine: Machine, tmp_path: Path) -> None:
    busy = machine.submit("import time\nwhile True:\n    time.sleep(0.1)\n")
    wait_until(lambda: (machine.jobdir / agent.BUSY).exists(), "the first cell to run", limit=SLACK)
    queued = machine.submit(f"open({str(tmp_path / 'ran')!r}, 'w').write('it ran')\n")
    wait_until(lambda: (queued.jobdir / "supervisor.pid").exists(), "the second cell to wait", limit=SLACK)
    time.sleep(0.5)
    queued.client.stop("cancelled")
    queued.finish()
    assert queued.exit["rc"] == 130 and queued.exit["reason"] == "cancelled", queued.records
    assert not any(r["k"] == agent.Kind.STARTED for r in queued.records)
    busy.client.stop("cancelled")
    busy.finish()
    assert busy.error()["ename"] == "KeyboardInterrupt"
    assert machine.run("'next'\n").value() == "'next'"
    assert not (tmp_path / "ran").exists()  # the kernel, once free, found the cell gone


def test_destroying_a_running_cell_interrupts_it_in_the_kernel(machine: Machine) -> None:
    machine.run("kept = 5\n")
    cell = machine.submit("import time\nwhile True:\n    time.sleep(0.1)\n")
    wait_until(lambda: (machine.jobdir / agent.BUSY).exists(), "the cell to run", limit=SLACK)
    cell.client.release()
    assert cell.client.destroy() and not cell.jobdir.exists()
    wait_until(lambda: not (machine.jobdir / agent.BUSY).exists(), "the kernel to be free", limit=SLACK)
    assert machine.run("kept\n").value() == "5"


def test_what_the_kernel_prints_between_cells_is_the_machines_output(machine: Machine) -> None:
    cell = machine.run("import threading, time, os\n"
                       "def later():\n    time.sleep(0.5)\n    print('from a thread, after the cell', flush=True)\n"
                       "    os.write(1, b'and from C level\\n')\n"
                       "threading.Thread(target=later).start()\n")
    assert cell.exit["rc"] == 0 and cell.out() == ""

    def machine_out() -> str:
        return "".join(r["d"] for r in machine.records() if r["k"] == agent.Kind.OUT)

    wait_until(lambda: "and from C level" in machine_out(), "the machine's log to have the thread's output",
               limit=SLACK)
    assert "from a thread, after the cell\n" in machine_out()


# -- idle -----------------------------------------------------------------------------------------------------------


def test_an_idle_machine_stops_itself_with_its_kernel(tmp_path: Path) -> None:
    m = Machine(tmp_path, idle=2)
    try:
        began = time.monotonic()
        records = list(m.stream.records())
        assert m.stream.exit is not None and m.stream.exit["reason"] == "idle", records
        assert 2 <= time.monotonic() - began < 2 + SLACK
        (pid,) = m.kernel_pids()
        wait_until(lambda: not alive(pid), "the kernel to be gone", limit=SLACK)
        # As a lapse without a recipe: work/ removed, the results kept for the client or a cleanup.
        wait_until(lambda: not (m.jobdir / "work").exists(), "the work folder to go", limit=SLACK)
        assert "ran no cell for 2 s (its idle limit)" in (m.jobdir / "agent.log").read_text()
        # A cell that comes now finds no process to run in.
        late = m.run("1\n")
        assert late.exit["rc"] == 2 and "has no Python process" in str(late.records)
    finally:
        m.close()


def test_a_running_cell_keeps_a_machine_from_going_idle(tmp_path: Path) -> None:
    m = Machine(tmp_path, idle=4)
    try:
        cell = m.run("import time\ntime.sleep(6)\n'done'\n")
        assert cell.value() == "'done'" and m.stream.exit is None
        assert not (m.jobdir / "exit.json").exists()
        list(m.stream.records())
        assert m.stream.exit is not None and m.stream.exit["reason"] == "idle"
    finally:
        m.close()


# -- kept mounts -----------------------------------------------------------------------------------------------------

KEY = "0123abcd"


def test_a_kept_mount_takes_only_what_changed_and_drops_what_is_gone(machine: Machine) -> None:
    mount = {"remote": "data", "mode": "ro", "keep": KEY}
    first = machine.run("import os\nsorted(os.listdir('data'))\n", mounts=[mount | {"present": ["a", "b", "old"]}],
                        files={"m/0/a": b"a1", "m/0/b": b"b1", "m/0/old": b"gone next"})
    assert first.value() == "['a', 'b', 'old']", first.records
    # The next cell: a changed, b unchanged (not sent), old deleted locally (not present).
    second = machine.run("import os\n(sorted(os.listdir('data')), open('data/a').read(), open('data/b').read())\n",
                         mounts=[mount | {"present": ["a", "b"]}], files={"m/0/a": b"a2"})
    assert second.value() == "(['a', 'b'], 'a2', 'b1')", second.records
    store = machine.jobdir / agent.STORES / KEY
    assert os.readlink(machine.jobdir / "work" / "data") == str(store)
    # The cells' destroys left the store and its link; the machine's destroy takes them.
    assert sorted(p.name for p in store.iterdir()) == ["a", "b"]


def test_a_kept_rw_mount_sends_back_only_what_each_cell_changed(machine: Machine) -> None:
    mount = {"remote": "out", "mode": "rw", "keep": KEY}
    one = machine.run("open('out/one.txt', 'w').write('1')\nvalue = 7\n", mounts=[mount], pull=["value"])
    assert sorted(one.results) == ["m/0/one.txt", "values.out.pkl"], one.records
    two = machine.run("open('out/two.txt', 'w').write('2')\n", mounts=[mount | {"present": ["one.txt"]}])
    assert sorted(two.results) == ["m/0/two.txt"]
    assert two.results["m/0/two.txt"] == b"2"


def test_a_kept_mount_with_a_bad_key_or_path_is_refused(machine: Machine, tmp_path: Path) -> None:
    for key in ("../../evil", "0123", "ABCDEF0123", 12345678):
        cell = machine.run("1\n", mounts=[{"remote": "d", "mode": "ro", "keep": key}], files={"m/0/f": b"x"})
        assert cell.exit["rc"] == 2 and cell.records[0]["k"] == agent.Kind.SETUP_ERROR, (key, cell.records)
    cell = machine.run("1\n", mounts=[{"remote": "d", "mode": "ro", "keep": KEY, "present": ["../x"]}])
    assert cell.exit["rc"] == 2 and "relative paths inside it" in cell.records[0]["m"]
    assert not (machine.jobdir / agent.STORES / "..").resolve().joinpath("evil").exists()
    # A member that climbs out is refused before anything is staged.
    bad = tarfile.TarInfo("m/0/../../../escaped")
    bad.size = 1
    with pytest.raises(RemoteSetupError):
        machine.submit("1\n", mounts=[{"remote": "e", "mode": "ro", "keep": KEY}], raw=[bad]).finish()
    assert not (tmp_path / "escaped").exists() and not (machine.root / "escaped").exists()
    # A link a cell made inside the store cannot carry a later upload out of it: the upload's folder replaces it.
    outside = tmp_path / "outside"
    outside.mkdir()
    machine.run(f"import os\nos.symlink({str(outside)!r}, 'w/sub')\n", mounts=[{"remote": "w", "mode": "rw",
                                                                               "keep": "ffff0000"}])
    assert (machine.jobdir / agent.STORES / "ffff0000" / "sub").is_symlink()
    cell = machine.run("open('w/sub/planted').read()\n", mounts=[{"remote": "w", "mode": "rw", "keep": "ffff0000"}],
                       files={"m/0/sub/planted": b"x"})
    assert cell.value() == "'x'", cell.records
    assert list(outside.iterdir()) == []
    assert not (machine.jobdir / agent.STORES / "ffff0000" / "sub").is_symlink()
    # The machine itself is unharmed.
    assert machine.run("'fine'\n").value() == "'fine'"


# -- the machine's end ------------------------------------------------------------------------------------------------


def test_stopping_the_machine_ends_its_kernel_and_its_destroy_takes_the_stores(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    cell = m.run("z = 1\n", mounts=[{"remote": "data", "mode": "ro", "keep": KEY}], files={"m/0/f": b"x"})
    pid = cell.kernel()
    began = time.monotonic()
    m.client.stop("cancelled")
    list(m.stream.records())
    assert m.stream.exit is not None and m.stream.exit["reason"] == "cancelled"
    assert time.monotonic() - began < agent._GRACE_SIGINT  # no cell ran: no grace to wait for
    wait_until(lambda: not alive(pid), "the kernel to end", limit=SLACK)
    assert (m.jobdir / agent.STORES / KEY / "f").exists()
    m.close()
    assert not m.jobdir.exists()
    wait_until(lambda: not processes_mentioning(str(m.jobdir)), "the machine's processes to end", limit=SLACK)


def test_stopping_the_machine_mid_cell_ends_the_cell_and_the_kernel(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    try:
        cell = m.submit("import time\nwhile True:\n    time.sleep(0.1)\n")
        wait_until(lambda: (m.jobdir / agent.BUSY).exists(), "the cell to run", limit=SLACK)
        m.client.stop("budget")
        list(m.stream.records())
        assert m.stream.exit is not None and m.stream.exit["reason"] == "budget"
        cell.finish()
        assert cell.exit["rc"] == 130 and cell.exit["reason"] == "budget", cell.records
        assert cell.error()["ename"] == "KeyboardInterrupt"  # the cell had its interrupt and its grace
        assert {"k": "note", "m": "the machine was stopped (budget) while this cell ran"} in [
            {k: v for k, v in r.items() if k != "t"} for r in cell.records]
        wait_until(lambda: not alive(cell.kernel()), "the kernel to end", limit=SLACK)
    finally:
        m.close()


def test_the_machines_money_covers_its_cells_and_ends_the_kernel(tmp_path: Path) -> None:
    """$1 a second with a $3 cap: the agent stops the machine at its cap whoever is (not) watching."""
    m = Machine(tmp_path, rate_usd_per_hour="3600", cap_usd="3")
    try:
        cell = m.submit("import time\nwhile True:\n    time.sleep(0.1)\n")
        list(m.stream.records())
        assert m.stream.exit is not None and m.stream.exit["reason"] == "budget"
        cell.finish()
        assert cell.exit["rc"] != 0 and cell.exit["reason"] == "budget", cell.records
        wait_until(lambda: not alive(cell.kernel()), "the kernel to end", limit=SLACK)
    finally:
        m.close()


def test_a_cell_whose_client_went_silent_is_stopped_and_the_kernel_lives_on(machine: Machine) -> None:
    machine.run("kept = 'here'\n")
    cell = machine.submit("import time\nwhile True:\n    time.sleep(0.1)\n", lease=1)
    cell.finish()
    assert cell.exit["reason"] == "lease" and cell.error()["ename"] == "KeyboardInterrupt", cell.records
    assert machine.run("kept\n").value() == "'here'"


def test_a_kernel_whose_supervisor_was_killed_ends_itself(tmp_path: Path) -> None:
    """Nothing would read its output or stop it: it does not linger, listening, on a machine nobody runs."""
    m = Machine(tmp_path)
    try:
        pid = m.run("import os\nos.getpid()\n").kernel()
        os.kill(int((m.jobdir / "supervisor.pid").read_text()), signal.SIGKILL)
        wait_until(lambda: not alive(pid), "the kernel to end", limit=SLACK)
    finally:
        m.close()


def test_the_mounts_given_at_up_are_the_machines_and_come_back_with_its_results(tmp_path: Path) -> None:
    m = Machine(tmp_path, mounts=[{"remote": "up", "mode": "rw"}], files={"m/0/seed.txt": b"seed"})
    try:
        cell = m.run("open('up/new.txt', 'w').write(open('up/seed.txt').read() + ' grown')\n")
        assert cell.exit["rc"] == 0 and cell.results == {}, cell.records  # the cell's results hold its own mounts
        m.client.stop("cancelled")
        list(m.stream.records())
        assert m.stream.read_results(_members) == {"m/0/new.txt": b"seed grown"}
    finally:
        m.close()
