"""%%burst and burst.run on ``--provider ssh`` against real OpenSSH sshd servers on loopback (tests/ssh_boxes.py).

Every job really runs: the agent goes over paramiko to the box, the cell runs in the box's remote home, the state
store and the ledger are SQLite under BURST_HOME. Each test checks what is left afterwards on the box (the job
folder, the job's processes) and in the books (state row, ledger row with the instance id and the declared rate).

The faults (dropped connections, cancel, the lease) are in test_ssh_jobs_faults.py; host keys and bad input in
test_ssh_jobs_refused.py.
"""

from __future__ import annotations

import math
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, last_job, ledger_rows, ok, run_cell, wait_until, write
from ssh_boxes import Boxes, assert_settled, output_lines
from sshd import SSHServer

import burst_jupyter as burst
from burst_jupyter.errors import RemoteError
from burst_jupyter.events import EventType
from burst_jupyter.job import Job, JobStatus
from burst_jupyter.spec import JobSpec

pytest_plugins = ("ssh_boxes",)
pytestmark = [pytest.mark.ssh, pytest.mark.timeout(90)]

PY = sys.executable  # the box is this machine: its cells get this venv's packages





# -- upload, run, download ----------------------------------------------------------------------------------


def test_mounts_go_up_with_ignores_and_rw_changes_come_back(ip: Any, boxes: Boxes, tmp_path: Path,
                                                            burst_home: Path) -> None:
    data = tmp_path / "data"
    write(data / ".gitignore", "*.log\nbuild/\n")
    write(data / ".burstignore", "secret.txt\n!keep.log\n")
    for name in ("a.txt", "run.log", "keep.log", "secret.txt", "build/blob.bin", "sub/b.txt"):
        write(data / name, name)
    out = tmp_path / "out"
    write(out / "keep.txt", "untouched")
    write(out / "edit.txt", "before")
    result, streams = run_cell(ip, cell(f"--host box1 --python {PY} --mount ./data:data:ro --mount ./out:out:rw "
                                        "--pull seen,where", """
        import os
        seen = sorted(os.path.relpath(os.path.join(d, f), "data") for d, _, fs in os.walk("data") for f in fs)
        where = os.environ["HOME"], os.getcwd()
        open("data/a.txt", "w").write("changed on the box")  # ro: never comes back
        assert open("out/edit.txt").read() == "before"
        open("out/edit.txt", "w").write("after")
        os.makedirs("out/deep/er")
        open("out/deep/er/new.bin", "wb").write(bytes(range(256)) * 64)
        print("done")
    """))
    ok(result, streams)
    assert ip.user_ns["seen"] == [".burstignore", ".gitignore", "a.txt", "keep.log", "sub/b.txt"]
    job = last_job()
    home, cwd = ip.user_ns["where"]
    assert home == str(boxes.home("box1"))
    assert cwd == str(boxes.jobdir(f"{job.id}@box1") / "work")
    assert (data / "a.txt").read_text() == "a.txt"
    assert (out / "keep.txt").read_text() == "untouched"
    assert (out / "edit.txt").read_text() == "after"
    assert (out / "deep" / "er" / "new.bin").read_bytes() == bytes(range(256)) * 64
    assert streams.lines() == [("stdout", "done")]
    assert job.status is JobStatus.COMPLETED
    assert_settled(boxes, burst_home, job, status="completed", host="box1")


def test_output_streams_live_in_order_nothing_lost_or_doubled(ip: Any, boxes: Boxes, tmp_path: Path,
                                                              burst_home: Path) -> None:
    """The cell waits for a file that this test creates only once it has seen the cell's first line as a job
    event: if output arrived only at the end, the cell would give up and fail."""
    go = tmp_path / "go"
    result, _ = run_cell(ip, cell(f"--host box1 --python {PY} --background", f"""
        import os, sys, time
        print("waiting for go", flush=True)
        for _ in range(3000):
            if os.path.exists({str(go)!r}):
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("the notebook never saw the first line while the cell ran")
        for i in range(400):
            print(f"line {{i}}", file=sys.stderr if i % 2 else sys.stdout)
    """))
    job = result.result
    assert isinstance(job, Job)
    wait_until(lambda: ("stdout", "waiting for go") in output_lines(job), "the first line to arrive", limit=30)
    assert not job.done()
    go.touch()
    assert job.wait(60).status is JobStatus.COMPLETED
    expected = [("stdout", "waiting for go")] + [("stderr" if i % 2 else "stdout", f"line {i}") for i in range(400)]
    assert output_lines(job) == expected
    assert_settled(boxes, burst_home, job, status="completed", host="box1")


def test_push_pull_and_the_last_expression_value(ip: Any, boxes: Boxes, burst_home: Path) -> None:
    ip.user_ns.update(lr=0.5, names=["a", "b"])
    result, streams = run_cell(ip, cell(f"--host box1 --python {PY} --push lr,names --pull loss,report", """
        import math
        loss = math.log(lr)
        report = {"names": names + ["c"], "lr": lr}
        loss * 2
    """))
    ok(result, streams)
    assert repr(result.result) == repr(math.log(0.5) * 2)
    assert ip.user_ns["loss"] == math.log(0.5)
    assert ip.user_ns["report"] == {"names": ["a", "b", "c"], "lr": 0.5}
    assert_settled(boxes, burst_home, last_job(), status="completed", host="box1")


def test_remote_exception_fails_the_cell_with_its_remote_traceback(ip: Any, boxes: Boxes, burst_home: Path) -> None:
    result, streams = run_cell(ip, cell(f"--host box1 --python {PY}", """
        print("before")
        def inner():
            raise ValueError("boom on the box")
        inner()
    """))
    error = result.error_in_exec
    assert isinstance(error, RemoteError)
    assert (error.ename, error.evalue) == ("ValueError", "boom on the box")
    tb = "\n".join(error.traceback)
    assert '"<burst-cell>", line 4' in tb and '"<burst-cell>", line 3, in inner' in tb
    assert 'raise ValueError("boom on the box")' in tb
    assert "ValueError: boom on the box" in streams.text()
    assert ("stdout", "before") in streams.lines()
    job = last_job()
    assert [e.type for e in job.events if e.is_final] == [EventType.FAILED]
    assert_settled(boxes, burst_home, job, status="failed", host="box1")


def test_the_default_python3_of_the_box_runs_the_cell(ip: Any, boxes: Boxes, burst_home: Path) -> None:
    result, streams = run_cell(ip, cell("--host box1 --pull exe,version", """
        import sys
        exe = sys.executable
        version = sys.version_info[:2]
    """))
    ok(result, streams)
    assert ip.user_ns["version"] >= (3, 8)
    assert ip.user_ns["exe"] != sys.executable  # the box's own python3, not this venv's
    job = last_job()
    assert list(job.plan.providers) == ["ssh"]
    assert_settled(boxes, burst_home, job, status="completed", host="box1")


# -- round-robin and billing --------------------------------------------------------------------------------


def test_hosts_alternate_and_the_declared_rate_is_billed(ip: Any, boxes: Boxes, burst_home: Path) -> None:
    homes = []
    for _ in range(3):
        result, streams = run_cell(ip, cell(f"--host box1,box2 --rate 0.40 --max-cost 0.05 --python {PY}", """
            import os
            os.environ["HOME"]
        """))
        ok(result, streams)
        homes.append(repr(result.result))
    jobs = burst.jobs()[-3:]
    hosts = ["box1", "box2", "box1"]
    assert homes == [repr(str(boxes.home(h))) for h in hosts]
    rows = {r.job_id: r for r in ledger_rows(burst_home)}
    for job, host in zip(jobs, hosts, strict=True):
        assert_settled(boxes, burst_home, job, status="completed", host=host, rate="0.40")
        row = rows[job.id]
        assert isinstance(row.actual_usd, Decimal)
        assert Decimal(0) < row.actual_usd <= Decimal("0.05")
        assert row.reserved_usd == Decimal("0.05")
        [final] = [e for e in job.events if e.is_final]
        assert final.total_cost_usd == row.actual_usd


# -- one connection --------------------------------------------------------------------------------------------


def test_one_ssh_connection_carries_a_whole_job(boxes: Boxes, box3: SSHServer, tmp_path: Path,
                                                burst_home: Path) -> None:
    """Through the Python API: upload of two mounts and a pushed variable, the stream, the lease, the results and
    the teardown all travel over the one connection the sshd accepted for the job."""
    write(tmp_path / "data" / "in.txt", "input")
    (tmp_path / "out").mkdir()
    before = box3.connections_seen()
    result = burst.run(JobSpec(
        cell="import time\nfor i in range(3):\n    print(i); time.sleep(0.5)\n"
             "open('out/r.txt', 'w').write(open('data/in.txt').read() + str(x))\ny = x + 1\n",
        provider="ssh", ssh_hosts=["box3"], remote_python=PY, lease_seconds=4,
        mount_local=["./data:data:ro", "./out:out:rw"], push=["x"], pull=["y"],
    ), namespace={"x": 41})
    assert result.status is JobStatus.COMPLETED
    assert result.values == {"y": 42}
    assert (tmp_path / "out" / "r.txt").read_text() == "input41"
    assert box3.connections_seen() - before == 1
    assert_settled(boxes, burst_home, last_job(), status="completed", host="box3")
