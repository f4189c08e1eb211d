"""A real OpenSSH sshd on loopback for tests, and ways to cut its connections.

Use it as a pytest plugin (``pytest_plugins = ("sshd",)`` in a test module; pytest puts tests/ on sys.path) for the
fixtures ``sshd_server`` (one daemon per test module) and ``fresh_sshd`` (one per test, for tests that kill
connections or read the daemon's log), or call :func:`start_sshd` directly.

The generated sshd_config, option by option:

- ``ListenAddress 127.0.0.1:<port>``: loopback only, on a port that was free a moment ago.
- ``HostKey``: fresh keys (ed25519 unless asked otherwise) in the temporary directory, so every server has its
  own identity and the tests control known_hosts completely.
- ``AuthorizedKeysFile``: a file in the temporary directory, so the user's (or root's) ~/.ssh is never read or
  written.
- ``PidFile``: in the temporary directory; the default /run/sshd.pid needs root and would clash with a system sshd.
- ``StrictModes no``: sshd would refuse an authorized_keys file whose directory is group/world-writable or owned
  by someone else (/tmp is world-writable).
- ``UsePAM``: ``no`` when it can be, because PAM's session modules (pam_loginuid, pam_motd) misbehave in some
  containers. But without PAM sshd refuses a "locked" account (a shadow password starting with "!", as Docker
  images often leave root) even for key logins, and a non-root sshd, unable to read /etc/shadow, refuses every
  account as locked (seen with OpenSSH 9.2, 2026-05); PAM's account check lets key logins through in both cases,
  so :func:`_need_pam` turns it on then. A non-root sshd can only log in its own user: the tests' user.
- ``PubkeyAuthentication yes``, ``PasswordAuthentication no``, ``KbdInteractiveAuthentication no``: keys are the
  only way in, so a refused key fails at once instead of falling back to a prompt.
- ``PermitRootLogin prohibit-password``: the tests may run as root (containers); keys only, as above.
- ``LogLevel VERBOSE``: logs "Connection from" per TCP connection and the fingerprint of each accepted key, which
  tests count. ``-e`` sends the log to stderr, which goes to ``sshd.log`` in the temporary directory.
- ``MaxStartups 100`` and ``MaxSessions 100``: parallel tests must not hit the default 10 unauthenticated
  connections or 10 channels per connection.
- ``UseDNS no``, ``PrintMotd no``, ``PrintLastLog no``: nothing slow or root-only between login and command.
- No ``Subsystem`` line: burst never opens SFTP.
- ``SetEnv``, only when :func:`start_sshd` is given ``env``: variables every session gets, as a provider injects
  its own into an instance (the fakes give each machine its id and a key scoped to it).
- ``ForceCommand``, only when :func:`start_sshd` is given a ``home``: every command runs there, with HOME set to it,
  through the user's shell as before (``$SHELL -c "$SSH_ORIGINAL_COMMAND"``). sshd itself always starts in the
  account's home from /etc/passwd, so this is how a test gets a remote home of its own (``~/.cache/burst/jobs``
  of the ssh provider lands in it) without touching the real one.

The module's docstring says PYTEST_DONT_REWRITE because test modules import it before pytest registers it as a
plugin; it has no asserts to rewrite.

Run as root, sshd still separates privileges and chroots its pre-auth child into /run/sshd, which must exist
(Debian's service creates it at boot; containers often lack it), so :func:`start_sshd` creates it then. Run as
another user, sshd skips the chroot.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")
# OpenSSH 9.8 moved per-connection work into sshd-session (and 10.0 pre-auth into sshd-auth); 9.2 forks sshd.
_CONNECTION_COMMS = {"sshd", "sshd-session", "sshd-auth"}

__all__ = [
    "SSHD",
    "SSHServer",
    "TcpProxy",
    "connection_pids",
    "descendants",
    "fresh_sshd",
    "kill_connections",
    "make_key",
    "sshd_server",
    "start_sshd",
]


@dataclass(frozen=True)
class SSHServer:
    host: str
    port: int
    user: str
    host_key_pub: str  # "ssh-ed25519 AAAA...", no comment
    client_key_path: Path  # authorized on the server; its public half is client_key_path + ".pub"
    known_hosts_path: Path  # holds known_hosts_line() and nothing else
    ssh_config_path: Path  # "Host sshd-test" with everything needed to log in
    pid: int
    log_path: Path = field(repr=False)
    host_key_pubs: tuple[str, ...] = ()  # every host key, host_key_pub first
    home: Path | None = None  # the remote HOME and working directory of every command; None: the account's own

    alias = "sshd-test"  # the Host name in ssh_config_path

    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_key_pub}\n"

    def ssh_argv(self, *command: str) -> list[str]:
        """argv for the plain OpenSSH client, logging in as the tests do (nothing from ~/.ssh)."""
        return [
            "ssh",
            "-F",
            "none",
            "-i",
            str(self.client_key_path),
            "-p",
            str(self.port),
            "-o",
            f"UserKnownHostsFile={self.known_hosts_path}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            f"{self.user}@{self.host}",
            *command,
        ]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connections_seen(self) -> int:
        """TCP connections the daemon has accepted so far, counting start_sshd's own probe for the banner."""
        return self.log().count("Connection from ")


def make_key(path: Path, kind: str = "ed25519", passphrase: str = "") -> str:
    """A fresh key pair at path (and path.pub); returns the public key as "type base64"."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "", "-f", str(path)], check=True, capture_output=True
    )
    return " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def start_sshd(
    workdir: Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    host_key_types: tuple[str, ...] = ("ed25519",),
    home: Path | None = None,
    path: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[SSHServer]:
    """Run sshd in the foreground until the block ends; yields once it answers with its SSH banner.

    ``host_key_types`` are ssh-keygen -t names; the first one's key is ``host_key_pub`` and is in known_hosts.
    ``home``, when given, is created and becomes HOME and the working directory of every command; ``path`` (with
    ``home``) is put first on PATH (a fake ``nvidia-smi`` for a rented GPU box). ``env`` is set in every session
    (``SetEnv``): what a provider injects into its instances (the instance id, a key scoped to it). ``host`` is
    the loopback address to listen on (a fake that gives each instance an address of its own and port 22)."""
    if not SSHD.exists():
        # Never a green run with the sshd tests skipped: `./dev test` installs it, or says it is missing.
        pytest.fail(f"OpenSSH server not installed ({SSHD} missing); apt-get install openssh-server")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    host_keys = [workdir / f"host_{kind}" for kind in host_key_types]
    host_key_pubs = tuple(make_key(path, kind) for path, kind in zip(host_keys, host_key_types, strict=True))
    client_key = workdir / "id_ed25519"
    (workdir / "authorized_keys").write_text(make_key(client_key) + "\n")
    force = ""
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        at = shlex.quote(str(home))
        extra = f"export PATH={shlex.quote(str(path))}:$PATH; " if path is not None else ""
        force = f'ForceCommand export HOME={at}; {extra}cd {at} && exec "$SHELL" -c "$SSH_ORIGINAL_COMMAND"\n'
    for attempt in range(5):
        listen_port = port or _free_port()
        config = workdir / "sshd_config"
        config.write_text(
            f"ListenAddress {host}:{listen_port}\n"
            + "".join(f"HostKey {path}\n" for path in host_keys)
            + f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
            + f"PidFile {workdir / 'sshd.pid'}\n"
            + f"StrictModes no\nUsePAM {'yes' if _need_pam(user) else 'no'}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nLogLevel VERBOSE\n"
            "MaxStartups 100\nMaxSessions 100\nUseDNS no\nPrintMotd no\nPrintLastLog no\n"
            # One line: sshd keeps the first SetEnv it reads and ignores the rest.
            + ("SetEnv " + " ".join(f"{name}={value}" for name, value in env.items()) + "\n" if env else "")
            + force
        )
        log_path = workdir / "sshd.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
        if _wait_for_banner(host, listen_port, proc):
            break
        proc.wait()
        if port is not None or attempt == 4:  # a fixed port cannot be retried; a random one lost a race
            raise RuntimeError(f"sshd did not start:\n{log_path.read_text()}")
    known_hosts = workdir / "known_hosts"
    server = SSHServer(
        host=host,
        port=listen_port,
        user=user,
        host_key_pub=host_key_pubs[0],
        host_key_pubs=host_key_pubs,
        client_key_path=client_key,
        known_hosts_path=known_hosts,
        ssh_config_path=workdir / "ssh_config",
        pid=proc.pid,
        log_path=log_path,
        home=home,
    )
    known_hosts.write_text(server.known_hosts_line())
    server.ssh_config_path.write_text(
        f"Host {server.alias}\n  HostName {host}\n  Port {listen_port}\n  User {user}\n"
        f"  IdentityFile {client_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n"
    )
    try:
        yield server
    finally:
        proc.terminate()  # the listener only; per-connection children end when their clients hang up
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _need_pam(user: str) -> bool:
    if os.geteuid() != 0:
        return True
    try:
        shadow = Path("/etc/shadow").read_text()
    except OSError:
        return False  # no shadow file: nothing marks the account locked
    for line in shadow.splitlines():
        name, password, *_ = line.split(":")
        if name == user:
            return password.startswith("!")
    return False


def _wait_for_banner(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return True
        except OSError:
            time.sleep(0.02)  # not listening yet
    return False


def _sshd_children() -> tuple[dict[int, list[int]], dict[int, str]]:
    """(children of each pid, command name of each pid) for every process, from /proc."""
    children: dict[int, list[int]] = {}
    comm: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ..."; comm may hold spaces and parentheses, so split at the last ")".
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        comm[int(entry.name)] = stat[stat.index("(") + 1 : stat.rindex(")")]
    return children, comm


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process under them (a job's agent supervisor and cell are not: they detach)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    return found


def connection_pids(server: SSHServer) -> list[int]:
    """The listener's children: one sshd process per live connection."""
    children, comm = _sshd_children()
    return [pid for pid in children.get(server.pid, []) if comm.get(pid) in _CONNECTION_COMMS]


def kill_connections(server: SSHServer) -> int:
    """SIGKILL every sshd process serving a connection, leaving the listener and the users' commands alive.

    The kernel then closes the TCP connections (the client sees EOF or a reset), much like a remote host that
    crashed; commands started over them live on until they write to their dead pipes. Returns how many
    connections were cut."""
    children, comm = _sshd_children()
    roots = [pid for pid in children.get(server.pid, []) if comm.get(pid) in _CONNECTION_COMMS]
    # A connection may be served by several sshd processes (privileged monitor, per-user child); any one left
    # alive keeps the socket open.
    todo = list(roots)
    while todo:
        pid = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        todo += [child for child in children.get(pid, []) if comm.get(child) in _CONNECTION_COMMS]
    return len(roots)


class TcpProxy:
    """A loopback TCP relay to 127.0.0.1:target_port, to cut or silence connections from the middle.

    ``drop_all()`` resets every relayed connection (what a crashed NAT box or a restarted load balancer does);
    ``blackhole()`` keeps them open but stops delivering bytes either way (a dead network: nothing arrives and
    nothing says so, only a keepalive can notice); ``restore()`` ends that: it resets the connections that lost
    bytes (their SSH streams are broken beyond repair) and relays new ones again."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._blackholed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self._blackholed.is_set():
                    dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def drop_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                # Linger 0: the close sends a RST, as a box that lost the connection's state answers.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # A close() alone would wait for the pump blocked in recv() on it; shutdown wakes that pump.
                s.shutdown(socket.SHUT_RD)
            s.close()

    def blackhole(self) -> None:
        self._blackholed.set()

    def restore(self) -> None:
        self._blackholed.clear()
        self.drop_all()

    def close(self) -> None:
        self._listener.close()
        self.drop_all()


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """One sshd for the whole test module: tests that only run commands share it."""
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def fresh_sshd(tmp_path: Path) -> Iterator[SSHServer]:
    """An sshd of the test's own, for tests that kill its connections or count them."""
    with start_sshd(tmp_path / "sshd") as server:
        yield server
