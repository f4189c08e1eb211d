"""%%burst --provider ssh refusing to run: host keys (unknown, changed, trust on first use) and bad input.

Each refusal is one clear UsageError line, and nothing is rented: no job folder on any box, no live row in the
state store, no reservation left, the ledger exactly as before (it holds one seeded row to compare against).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from burst_checks import (
    cell,
    last_job,
    ledger_rows,
    live_instances,
    open_reservations,
    run_cell,
    seed_ledger,
    usage_line,
)
from ssh_boxes import Boxes, assert_settled, fingerprint
from sshd import SSHServer, make_key

from burst_jupyter.job import JobStatus

pytest_plugins = ("ssh_boxes",)
pytestmark = [pytest.mark.ssh, pytest.mark.timeout(90)]

PY = sys.executable



def closed_port() -> int:
    """A loopback port that was free a moment ago: nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def books(boxes: Boxes, burst_home: Path) -> Any:
    """Seed the ledger, then (called) check that nothing was rented since."""
    seed = seed_ledger(burst_home)
    before = boxes.jobdirs()

    def nothing_rented() -> None:
        assert boxes.jobdirs() == before
        assert live_instances(burst_home) == []
        assert open_reservations(burst_home) == []
        assert ledger_rows(burst_home) == [seed]

    return nothing_rented


@pytest.fixture
def box1(two_sshd: list[SSHServer]) -> SSHServer:
    return two_sshd[0]


# -- host keys ------------------------------------------------------------------------------------------------


def test_unknown_host_key_is_refused_with_its_fingerprint(ip: Any, boxes: Boxes, box1: SSHServer, tmp_path: Path,
                                                          books: Any) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    boxes.alias("box1", box1, known_hosts=known)
    result, _ = run_cell(ip, cell(f"--host box1 --python {PY}"))
    line = usage_line(result)
    assert "unknown" in line and fingerprint(box1.host_key_pub) in line
    assert "--trust-new-host" in line and f"ssh-keyscan -p {box1.port} 127.0.0.1 >> {known}" in line
    assert known.read_text() == ""
    books()


def test_trust_new_host_records_the_key_and_later_jobs_use_it(ip: Any, boxes: Boxes, box1: SSHServer,
                                                              tmp_path: Path, burst_home: Path) -> None:
    known = tmp_path / "known_hosts"
    boxes.alias("box1", box1, known_hosts=known)  # no file yet: ssh creates it on first use too
    result, streams = run_cell(ip, cell(f"--host box1 --python {PY} --trust-new-host", "6 * 7"))
    assert result.error_in_exec is None, streams.text(ours=True)
    assert repr(result.result) == "42"
    assert known.read_text() == box1.known_hosts_line()
    assert_settled(boxes, burst_home, last_job(), status="completed", host="box1")
    # The recorded key is the one checked from now on: no flag needed, nothing appended.
    result, streams = run_cell(ip, cell(f"--host box1 --python {PY}", "7 * 6"))
    assert result.error_in_exec is None, streams.text(ours=True)
    assert repr(result.result) == "42"
    assert known.read_text() == box1.known_hosts_line()


def test_changed_host_key_is_refused_even_with_trust_new_host(ip: Any, boxes: Boxes, box1: SSHServer,
                                                              tmp_path: Path, books: Any) -> None:
    impostor = make_key(tmp_path / "impostor")  # the key known_hosts holds; the box shows another
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{box1.port} {impostor}\n")
    boxes.alias("box1", box1, known_hosts=known)
    result, _ = run_cell(ip, cell(f"--host box1 --python {PY} --trust-new-host"))
    line = usage_line(result)
    assert "CHANGED" in line and fingerprint(box1.host_key_pub) in line
    assert f"{known} line 1" in line and "ssh-keygen -R" in line
    assert known.read_text() == f"[127.0.0.1]:{box1.port} {impostor}\n"
    books()


# -- bad input ----------------------------------------------------------------------------------------------


def test_unreachable_host(ip: Any, boxes: Boxes, box1: SSHServer, books: Any) -> None:
    port = closed_port()
    boxes.alias("box1", box1, port=port)
    result, _ = run_cell(ip, cell(f"--host box1 --python {PY}"))
    line = usage_line(result)
    assert f"cannot reach {box1.user}@box1:{port}" in line and "connection refused" in line
    books()


def test_key_the_server_does_not_accept(ip: Any, boxes: Boxes, box1: SSHServer, tmp_path: Path,
                                        books: Any) -> None:
    stranger = tmp_path / "stranger"
    make_key(stranger)
    boxes.alias("box1", box1, key=stranger)
    result, _ = run_cell(ip, cell(f"--host box1 --python {PY}"))
    line = usage_line(result)
    assert f"refused the login of user {box1.user}" in line and str(stranger) in line
    books()


def test_malformed_key_file(ip: Any, boxes: Boxes, box1: SSHServer, tmp_path: Path, books: Any) -> None:
    broken = tmp_path / "broken_key"
    broken.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n")
    boxes.alias("box1", box1, key=broken)
    result, _ = run_cell(ip, cell(f"--host box1 --python {PY}"))
    line = usage_line(result)
    assert f"cannot use key {broken}" in line and "not a private key" in line
    books()


def test_no_python_on_the_box(ip: Any, boxes: Boxes, books: Any) -> None:
    result, _ = run_cell(ip, cell("--host box1 --python /nonexistent/python3"))
    line = usage_line(result)
    assert "no Python 3 on" in line and "box1" in line
    assert last_job().status is JobStatus.FAILED
    books()


def test_host_with_provider_local(ip: Any, boxes: Boxes, books: Any) -> None:
    result, _ = run_cell(ip, cell("--host box1 --provider local"))
    assert "--host is for provider ssh, not local" in usage_line(result)
    books()
