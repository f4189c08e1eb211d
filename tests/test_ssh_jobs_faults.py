"""ssh jobs when things go wrong: connections dropped mid-run and mid-results, cancel, the agent's lease.

Connections are cut for real: a TcpProxy between client and sshd resets them (``drop_all``) or silences them
(``blackhole``), or the sshd processes serving them are killed (``kill_connections``). Every cut is made at a
point the test has seen the job reach (a line of output, the exit), and the cell waits on gate files the test
creates only after the client has noticed, so each cut lands mid-run by causality, not by timing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from burst_checks import gated_lines_cell, run_cell, wait_until
from ssh_boxes import Boxes, assert_settled, count, output_lines
from sshd import SSHServer, TcpProxy, kill_connections

import burst_jupyter as burst
from burst_jupyter.events import EventType, JobEvent
from burst_jupyter.job import Job, JobStatus
from burst_jupyter.spec import JobSpec

pytest_plugins = ("ssh_boxes",)
pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

PY = sys.executable


@pytest.fixture
def proxy(boxes: Boxes, two_sshd: list[SSHServer]) -> Iterator[TcpProxy]:
    """``Host boxp``: box1's sshd through a TcpProxy."""
    relay = boxes.via_proxy("boxp", two_sshd[0])
    yield relay
    relay.close()


def submit(host: str, body: str, **fields: Any) -> Job:
    spec = JobSpec(cell=textwrap.dedent(body).strip() + "\n", provider="ssh", ssh_hosts=[host], remote_python=PY,
                   mount_local=["./out:out:rw"], **fields)
    return burst.submit(spec, namespace={})


def seen(job: Job, stream: str, line: str) -> Callable[[], bool]:
    return lambda: (stream, line) in output_lines(job)


# -- dropped connections ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["proxy-reset", "sshd-killed"])
def test_dropped_connections_mid_run_lose_and_double_nothing(cut: str, boxes: Boxes, box3: SSHServer,
                                                             tmp_path: Path, burst_home: Path) -> None:
    if cut == "proxy-reset":
        relay = boxes.via_proxy("boxp", box3)
        host, do_cut = "boxp", relay.drop_all
    else:
        relay = None
        host = "box3"

        def do_cut() -> None:
            assert kill_connections(box3) == 1  # the job's one connection

    gates = {10: str(tmp_path / "gate10"), 25: str(tmp_path / "gate25"), 40: str(tmp_path / "gate40")}
    (tmp_path / "out").mkdir()
    try:
        job = submit(host, gated_lines_cell(60, gates, pause=0.03), name="drops")
        for n, (at, gate) in enumerate(gates.items(), 1):
            wait_until(seen(job, "stdout", f"line {at}"), f"line {at}", limit=60)
            do_cut()
            wait_until(lambda n=n: count(job, EventType.RECONNECTING) >= n, f"reconnect {n}", limit=60)
            Path(gate).touch()
        result = job.wait(90)
    finally:
        if relay is not None:
            relay.close()
    assert result.status is JobStatus.COMPLETED, result.error
    assert output_lines(job) == [("stderr" if i % 3 == 2 else "stdout", f"line {i}") for i in range(60)]
    assert count(job, EventType.RECONNECTING) == 3
    assert (tmp_path / "out" / "done.txt").read_text() == "all 60 lines"
    assert_settled(boxes, burst_home, job, status="completed", host=host)


@pytest.mark.parametrize("close_raises", [False, True], ids=["plain", "close-raises"])
def test_drop_while_the_results_come_back(close_raises: bool, boxes: Boxes, proxy: TcpProxy, tmp_path: Path,
                                          burst_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """48 MiB of new rw output: the connection is reset the moment the client sees the exit record, long before
    the results (several SSH windows) can have arrived; the client re-attaches and fetches them again.

    ``close-raises``: when paramiko has not yet noticed the reset, closing a channel tries to tell the server and
    raises EOFError (seen under load, where it killed the results reader and left the job waiting forever).
    Here every channel close after the cut raises that way, so the race is taken every time."""
    (tmp_path / "out").mkdir()
    cut: list[JobEvent] = []
    if close_raises:
        close = paramiko.Channel.close

        def close_then_raise(channel: paramiko.Channel) -> None:
            close(channel)
            if cut:
                raise EOFError

        monkeypatch.setattr(paramiko.Channel, "close", close_then_raise)

    def on_event(event: JobEvent) -> None:  # on the session loop, right as the exit record is handled
        if event.type is EventType.SYNCING_DOWN and not cut:
            cut.append(event)
            proxy.drop_all()

    job = submit("boxp", """
        import hashlib, os
        data = os.urandom(48 * 2**20)
        open("out/big.bin", "wb").write(data)
        print(hashlib.sha256(data).hexdigest())
    """)
    job.add_listener(on_event)
    result = job.wait(60)
    assert result.status is JobStatus.COMPLETED, result.error
    types = [e.type for e in job.events]
    assert EventType.RECONNECTING in types[types.index(EventType.SYNCING_DOWN):]
    [(_, digest)] = output_lines(job)
    assert hashlib.sha256((tmp_path / "out" / "big.bin").read_bytes()).hexdigest() == digest
    assert_settled(boxes, burst_home, job, status="completed", host="boxp")


# -- cancel -----------------------------------------------------------------------------------------------------


def test_cancel_syncs_back_and_ends_the_instance(ip: Any, boxes: Boxes, tmp_path: Path, burst_home: Path) -> None:
    (tmp_path / "out").mkdir()
    body = textwrap.dedent("""
        import time
        open("out/partial.txt", "w").write("written before the cancel")
        print("ready", flush=True)
        time.sleep(120)
        open("out/late.txt", "w").write("must not happen")
    """)
    result, _ = run_cell(ip, f"%%burst --host box1 --python {PY} --mount ./out:out:rw --background\n{body}")
    job = result.result
    assert isinstance(job, Job)
    wait_until(seen(job, "stdout", "ready"), "the cell to start", limit=30)
    assert boxes.jobdir(f"{job.id}@box1").is_dir()
    job.cancel()
    assert job.wait(60).status is JobStatus.CANCELLED
    assert [e.type for e in job.events if e.is_final] == [EventType.CANCELLED]
    assert (tmp_path / "out" / "partial.txt").read_text() == "written before the cancel"
    assert not (tmp_path / "out" / "late.txt").exists()
    assert_settled(boxes, burst_home, job, status="cancelled", host="box1")


# -- the lease ----------------------------------------------------------------------------------------------------


def test_the_agent_stops_a_job_whose_lease_lapses(boxes: Boxes, proxy: TcpProxy, tmp_path: Path,
                                                  burst_home: Path) -> None:
    """The network goes dead (a blackhole: nothing arrives, nothing says so). The agent, no longer hearing the
    client's lease renewals, stops the job on its own after --lease 2 s and leaves its folder with the results;
    once the network is back, the client re-attaches, brings the results home and ends the instance."""
    (tmp_path / "out").mkdir()
    job = submit("boxp", """
        import time
        open("out/partial.txt", "w").write("written before the lease lapsed")
        print("ready", flush=True)
        time.sleep(120)
        open("out/late.txt", "w").write("must not happen")
    """, lease_seconds=2)
    wait_until(seen(job, "stdout", "ready"), "the cell to start", limit=30)
    proxy.blackhole()
    jobdir = boxes.jobdir(f"{job.id}@boxp")
    wait_until((jobdir / "exit.json").exists, "the agent to stop the job", limit=30)
    assert json.loads((jobdir / "exit.json").read_text())["reason"] == "lease"
    assert not job.done()  # the client cannot know yet: the network is still dead
    assert jobdir.is_dir()  # the folder (and the results in it) wait for the client or a cleanup
    proxy.restore()
    result = job.wait(90)
    assert result.status is JobStatus.FAILED
    assert "lease lapsed" in str(result.error)
    assert count(job, EventType.RECONNECTING) >= 1
    assert (tmp_path / "out" / "partial.txt").read_text() == "written before the lease lapsed"
    assert not (tmp_path / "out" / "late.txt").exists()
    assert_settled(boxes, burst_home, job, status="failed", host="boxp")
