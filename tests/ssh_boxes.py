"""Boxes for ``%%burst --provider ssh`` tests: real sshd servers with remote homes of their own, an ssh config that
names them (``box1``, ``box2``) through ``$BURST_SSH_CONFIG``, and what a job leaves on them.

A pytest plugin (``pytest_plugins = ("ssh_boxes",)`` in a test module) with the fixtures

- ``two_sshd``: two sshd servers for the whole module, each with its own remote home (tests/sshd.py's ``home``), so
  the ssh provider's ``~/.cache/burst/jobs`` is a folder these tests own and can list;
- ``boxes``: per test, an isolated client side (HOME, no ssh-agent) and a config with ``box1`` and ``box2``
  pointing at the two servers; ``boxes.alias(...)`` adds aliases with other ports, keys or known_hosts, and
  ``boxes.via_proxy(...)`` one that goes through a :class:`~sshd.TcpProxy`;
- ``box3``: a server of the test's own (``Host box3``), for counting or killing its connections.

What is left on a box is read from the box's file system and from /proc: the job folder
(``<home>/.cache/burst/jobs/<job id>``) and any process whose command line names the job (the agent's ``run`` and
``attach`` fronts, its supervisor and the cell are all forks of a command that names the job folder).

PYTEST_DONT_REWRITE: test modules import this module before pytest registers it as a plugin, too late for assert
rewriting, so its asserts carry their own messages.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from burst_checks import ledger_rows, open_reservations, state_row, wait_until
from sshd import SSHServer, TcpProxy, start_sshd

from burst_jupyter.events import EventType
from burst_jupyter.job import Job

JOB_ROOT = ".cache/burst/jobs"  # the ssh provider's job root, relative to the remote home


def fingerprint(public_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of "type base64" (what ``ssh-keygen -lf`` prints)."""
    digest = hashlib.sha256(base64.b64decode(public_key.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def agent_pids(job_id: str) -> list[int]:
    """Every process on this machine whose command line names the job."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # gone meanwhile
            if job_id.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


@dataclass
class Boxes:
    config: Path  # what $BURST_SSH_CONFIG names
    tmp: Path
    hosts: dict[str, SSHServer] = field(default_factory=dict)  # alias -> the server behind it
    _blocks: dict[str, str] = field(default_factory=dict)

    def alias(self, name: str, server: SSHServer, *, port: int | None = None, key: Path | None = None,
              known_hosts: Path | None = None) -> str:
        """(Re)define ``Host name`` in the config: the server's address, user and key, each overridable."""
        self.hosts[name] = server
        self._blocks[name] = (
            f"Host {name}\n  HostName {server.host}\n  Port {port or server.port}\n  User {server.user}\n"
            f"  IdentityFile {key or server.client_key_path}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known_hosts or server.known_hosts_path}\n"
        )
        self.config.write_text("".join(self._blocks.values()))
        return name

    def via_proxy(self, name: str, server: SSHServer) -> TcpProxy:
        """``Host name`` reaches ``server`` through a TcpProxy (the caller closes it); known_hosts names the
        proxy's port, as ssh would."""
        proxy = TcpProxy(server.port)
        known = self.tmp / f"known_hosts_{name}"
        known.write_text(f"[{server.host}]:{proxy.port} {server.host_key_pub}\n")
        self.alias(name, server, port=proxy.port, known_hosts=known)
        return proxy

    def home(self, host: str) -> Path:
        home = self.hosts[host].home
        assert home is not None, f"{host} has no remote home of its own"
        return home

    def jobdir(self, instance_id: str) -> Path:
        """Where the instance ``JOB@ALIAS`` lives on its box."""
        job_id, _, host = instance_id.partition("@")
        return self.home(host) / JOB_ROOT / job_id

    def jobdirs(self) -> set[Path]:
        """Every job folder on every box."""
        found: set[Path] = set()
        for host in self.hosts:
            root = self.home(host) / JOB_ROOT
            found |= set(root.iterdir()) if root.is_dir() else set()
        return found


@pytest.fixture(scope="module")
def two_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SSHServer]]:
    with contextlib.ExitStack() as stack:
        servers = []
        for name in ("box1", "box2"):
            workdir = tmp_path_factory.mktemp(name)
            servers.append(stack.enter_context(start_sshd(workdir / "sshd", home=workdir / "home")))
        yield servers


@pytest.fixture
def boxes(two_sshd: list[SSHServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Boxes:
    """The client side of this test only: HOME is an empty folder (no ~/.ssh), no ssh-agent, and
    $BURST_SSH_CONFIG names box1 and box2."""
    home = tmp_path / "client-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    config = tmp_path / "ssh_config"
    monkeypatch.setenv("BURST_SSH_CONFIG", str(config))
    found = Boxes(config, tmp_path)
    found.alias("box1", two_sshd[0])
    found.alias("box2", two_sshd[1])
    return found


@pytest.fixture
def box3(boxes: Boxes, tmp_path: Path) -> Iterator[SSHServer]:
    """An sshd of this test's own behind ``Host box3``, for counting or killing its connections."""
    with start_sshd(tmp_path / "box3" / "sshd", home=tmp_path / "box3" / "home") as server:
        boxes.alias("box3", server)
        yield server


def assert_instance_gone(boxes: Boxes, instance_id: str) -> None:
    """The job folder is gone from its box and no process of the job is left there."""
    assert not boxes.jobdir(instance_id).exists(), f"{instance_id} still has its folder"
    job_id = instance_id.partition("@")[0]
    # A front command exits once its channel is closed, a moment after the job's end: wait for that, boundedly.
    wait_until(lambda: agent_pids(job_id) == [], f"the processes of {job_id} to end", limit=15)


def assert_settled(boxes: Boxes, burst_home: Path, job: Job, *, status: str, host: str,
                   rate: str = "0") -> None:
    """After a job that ran: instance gone, state row terminated, one ledger row for it (provider ssh, the
    instance id on ``host``, the declared rate, a Decimal bill), no reservation left open."""
    instance_id = f"{job.id}@{host}"
    assert_instance_gone(boxes, instance_id)
    row = state_row(burst_home, job.id)
    assert row is not None and row.state == "terminated", f"state row of {job.id}: {row}"
    entries = [r for r in ledger_rows(burst_home) if r.job_id == job.id]
    assert len(entries) == 1, f"ledger rows of {job.id}: {entries}"
    entry = entries[0]
    got = (entry.provider, entry.instance_id, entry.status, entry.rate_usd_per_hour)
    assert got == ("ssh", instance_id, status, Decimal(rate)), f"ledger row of {job.id}: {entry}"
    assert isinstance(entry.actual_usd, Decimal), f"ledger row of {job.id}: {entry}"
    assert open_reservations(burst_home) == [], f"open reservations: {open_reservations(burst_home)}"


def output_lines(job: Job) -> list[tuple[str, str]]:
    """The job's OUTPUT events as complete (stream, line) pairs, in the order they were emitted."""
    partial = {"stdout": "", "stderr": ""}
    lines: list[tuple[str, str]] = []
    for event in job.events:
        if event.type is EventType.OUTPUT and event.stream in partial and event.text is not None:
            *done, partial[event.stream] = (partial[event.stream] + event.text).split("\n")
            lines.extend((event.stream, line) for line in done)
    return lines


def count(job: Job, kind: EventType) -> int:
    return sum(1 for e in job.events if e.type is kind)
