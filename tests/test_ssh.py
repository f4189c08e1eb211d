"""SSHRunner against a real OpenSSH sshd on loopback (tests/sshd.py)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sshd import SSHServer, TcpProxy, connection_pids, kill_connections, make_key, start_sshd

from burst_jupyter.errors import AuthFailed, ConnectFailed, HostKeyError
from burst_jupyter.providers.base import Endpoint
from burst_jupyter.runner import RemoteProcess, run
from burst_jupyter.ssh import SSHRunner

pytestmark = pytest.mark.ssh

PY = "python3"  # the remote side's python, found by its login shell


@pytest.fixture(autouse=True)
def no_user_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the real ~/.ssh, ssh-agent and BURST_SSH_CONFIG out: HOME is an empty directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("BURST_SSH_CONFIG", raising=False)
    return home


def endpoint(server: SSHServer, **changes: Any) -> Endpoint:
    plain = Endpoint(host=server.host, port=server.port, key_path=str(server.client_key_path))
    return dataclasses.replace(plain, **changes)


def connect(server: SSHServer, *, known_hosts: Path | None = None, **changes: Any) -> SSHRunner:
    return SSHRunner.connect(endpoint(server, **changes), known_hosts=known_hosts or server.known_hosts_path)


@pytest.fixture
def runner(sshd_server: SSHServer) -> Iterator[SSHRunner]:
    r = connect(sshd_server)
    yield r
    r.close()


def fingerprint(public_key: str) -> str:
    digest = hashlib.sha256(base64.b64decode(public_key.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --- commands ----------------------------------------------------------------------------------------------------


def test_command_status_stdout_stderr(runner: SSHRunner) -> None:
    done = run(runner, [PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    assert run(runner, ["true"]).returncode == 0


def test_description(runner: SSHRunner, sshd_server: SSHServer) -> None:
    assert runner.description == f"{sshd_server.user}@127.0.0.1:{sshd_server.port}"


def test_argv_reaches_the_command_verbatim(runner: SSHRunner) -> None:
    args = ["a b", "$HOME", "it's", '"q"', "*", "; rm -rf /", ""]
    done = run(runner, [PY, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *args])
    assert json.loads(done.stdout) == args


def read_line(proc: RemoteProcess) -> bytes:
    """One line, however the writes and packets split it (python -u writes a print's text and its newline apart)."""
    line = b""
    while not line.endswith(b"\n") and (chunk := proc.read(1)):
        line += chunk
    return line


def test_output_streams_while_the_command_runs(runner: SSHRunner) -> None:
    # Prints a line every 0.2 s for 2 s; the first line must arrive before the exit status does.
    proc = runner.start([PY, "-u", "-c", "import time\nfor i in range(10): print(i); time.sleep(0.2)"])
    proc.close_stdin()
    first = read_line(proc)
    running_after_first = proc.wait(0) is None
    rest = b""
    while chunk := proc.read():
        rest += chunk
    assert first == b"0\n"
    assert running_after_first
    assert (first + rest).split() == [str(i).encode() for i in range(10)]
    assert proc.wait(5) == 0
    proc.close()


@pytest.mark.timeout(30)
def test_output_is_delivered_before_the_command_ends(runner: SSHRunner) -> None:
    # The command prints, then waits for us: if the first line were held back until exit, this would hang.
    proc = runner.start([PY, "-u", "-c", "import sys; print('ready'); sys.stdin.readline(); print('bye')"])
    assert read_line(proc) == b"ready\n"
    proc.write(b"go\n")
    assert read_line(proc) == b"bye\n"
    assert proc.read() == b""
    assert proc.wait(5) == 0
    proc.close()


def test_stdin_5mb_binary_round_trips(runner: SSHRunner) -> None:
    data = os.urandom(5 * 2**20)
    script = "import sys, hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"
    done = run(runner, [PY, "-c", script], input=data)
    assert done.stdout.decode().strip() == hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(60)
def test_one_reader_and_one_writer_thread_echo_5mb(runner: SSHRunner) -> None:
    # More than both windows: without a concurrent reader the writer would block forever.
    data = os.urandom(5 * 2**20)
    proc = runner.start(["cat"])

    def feed() -> None:
        proc.write(data)
        proc.close_stdin()

    writer = threading.Thread(target=feed)
    writer.start()
    received = bytearray()
    while chunk := proc.read():
        received += chunk
    writer.join()
    assert received == data
    assert proc.wait(5) == 0
    proc.close()


def test_wait_returns_none_while_running(runner: SSHRunner) -> None:
    proc = runner.start(["cat"])
    assert proc.wait(0.2) is None
    proc.close_stdin()
    assert proc.wait(10) == 0
    proc.close()


def test_command_killed_by_signal_is_minus_one(runner: SSHRunner) -> None:
    done = run(runner, ["sh", "-c", "kill -9 $$"])
    assert done.returncode == -1


def test_write_after_exit_is_broken_pipe(runner: SSHRunner) -> None:
    proc = runner.start(["true"])
    assert proc.wait(10) == 0
    while proc.read():
        pass
    with pytest.raises(BrokenPipeError):
        for _ in range(100):  # the channel's close can trail the exit status by a packet
            proc.write(b"x" * 65536)
    proc.close()


def test_write_after_close_stdin_is_broken_pipe(runner: SSHRunner) -> None:
    proc = runner.start(["cat"])
    proc.close_stdin()
    with pytest.raises(BrokenPipeError):
        proc.write(b"late")
    proc.close()


def test_many_channels_share_one_connection(fresh_sshd: SSHServer) -> None:
    before = fresh_sshd.connections_seen()
    r = connect(fresh_sshd)
    procs = [r.start(["cat"]) for _ in range(4)]
    assert len(connection_pids(fresh_sshd)) == 1  # four live channels, one connection
    for i, proc in enumerate(procs):
        proc.write(f"{i}\n".encode())
        proc.close_stdin()
    assert [read_line(proc) for proc in procs] == [b"0\n", b"1\n", b"2\n", b"3\n"]
    assert [run(r, ["echo", str(i)]).stdout for i in range(3)] == [b"0\n", b"1\n", b"2\n"]
    r.close()
    assert fresh_sshd.connections_seen() - before == 1


def test_fixture_files_serve_openssh_and_the_runner(sshd_server: SSHServer) -> None:
    subprocess.run(sshd_server.ssh_argv("true"), check=True, capture_output=True)
    by_config = ["ssh", "-F", str(sshd_server.ssh_config_path), sshd_server.alias, "echo", "hi"]
    assert subprocess.run(by_config, check=True, capture_output=True).stdout == b"hi\n"
    r = SSHRunner.connect(Endpoint(host=sshd_server.alias), ssh_config=sshd_server.ssh_config_path)
    assert run(r, ["echo", "hi"]).stdout == b"hi\n"
    r.close()


def test_importing_the_package_does_not_import_paramiko() -> None:
    code = "import sys, burst_jupyter, burst_jupyter.runner; sys.exit('paramiko' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- host keys ---------------------------------------------------------------------------------------------------


def test_unknown_host_is_refused_with_its_fingerprint(sshd_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    with pytest.raises(HostKeyError) as err:
        connect(sshd_server, known_hosts=known_hosts)
    message = str(err.value)
    assert f"host key of 127.0.0.1:{sshd_server.port} is unknown" in message
    assert fingerprint(sshd_server.host_key_pub) in message
    assert f"ssh-keyscan -p {sshd_server.port} 127.0.0.1 >> {known_hosts}" in message
    assert "--trust-new-host" in message
    assert known_hosts.read_text() == ""


def test_trust_on_first_use_records_the_key(sshd_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "new" / "known_hosts"  # neither the file nor its directory exists yet
    connect(sshd_server, known_hosts=known_hosts, trust_on_first_use=True).close()
    assert known_hosts.read_text() == sshd_server.known_hosts_line()
    # Accepted from now on without TOFU, by us and by OpenSSH.
    run(r := connect(sshd_server, known_hosts=known_hosts), ["true"])
    r.close()
    argv = sshd_server.ssh_argv("true")
    argv[argv.index(f"UserKnownHostsFile={sshd_server.known_hosts_path}")] = f"UserKnownHostsFile={known_hosts}"
    subprocess.run(argv, check=True, capture_output=True)


def test_trust_on_first_use_appends_after_a_line_without_newline(sshd_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("# no newline at the end")
    connect(sshd_server, known_hosts=known_hosts, trust_on_first_use=True).close()
    assert known_hosts.read_text() == "# no newline at the end\n" + sshd_server.known_hosts_line()


@pytest.mark.parametrize("trust_on_first_use", [False, True])
def test_changed_host_key_is_refused(sshd_server: SSHServer, tmp_path: Path, trust_on_first_use: bool) -> None:
    other = make_key(tmp_path / "other")
    known_hosts = tmp_path / "known_hosts"
    before = f"# a comment\n[127.0.0.1]:{sshd_server.port} {other}\n"
    known_hosts.write_text(before)
    with pytest.raises(HostKeyError) as err:
        connect(sshd_server, known_hosts=known_hosts, trust_on_first_use=trust_on_first_use)
    message = str(err.value)
    assert f"host key for 127.0.0.1:{sshd_server.port} has CHANGED" in message
    assert f"{known_hosts} line 2" in message
    assert fingerprint(sshd_server.host_key_pub) in message
    assert known_hosts.read_text() == before


def test_hashed_known_hosts_entries(sshd_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd_server.known_hosts_line())
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    assert known_hosts.read_text().startswith("|1|")
    connect(sshd_server, known_hosts=known_hosts).close()
    # A hashed entry for another key is a changed key, not an unknown one.
    known_hosts.write_text(f"[127.0.0.1]:{sshd_server.port} {make_key(tmp_path / 'other')}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    with pytest.raises(HostKeyError, match="CHANGED"):
        connect(sshd_server, known_hosts=known_hosts, trust_on_first_use=True)


def test_entry_for_port_22_does_not_cover_another_port(sshd_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"127.0.0.1 {sshd_server.host_key_pub}\n")
    with pytest.raises(HostKeyError, match="unknown"):
        connect(sshd_server, known_hosts=known_hosts)


def test_wildcard_and_negated_entries(sshd_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.?]:*,!10.* {sshd_server.host_key_pub}\n")
    connect(sshd_server, known_hosts=known_hosts).close()
    known_hosts.write_text(f"*,![127.0.0.1]:{sshd_server.port} {sshd_server.host_key_pub}\n")
    with pytest.raises(HostKeyError, match="unknown"):
        connect(sshd_server, known_hosts=known_hosts)


def test_revoked_key_is_refused(sshd_server: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{sshd_server.known_hosts_line()}@revoked * {sshd_server.host_key_pub}\n")
    with pytest.raises(HostKeyError, match="revoked"):
        connect(sshd_server, known_hosts=known_hosts, trust_on_first_use=True)


def test_asks_for_the_key_type_already_known(tmp_path: Path) -> None:
    # The server has ed25519 and ECDSA keys; known_hosts holds only the ECDSA one. Like ssh, the runner must ask
    # for ECDSA instead of taking the ed25519 key and calling it changed.
    with start_sshd(tmp_path / "sshd", host_key_types=("ecdsa", "ed25519")) as server:
        assert server.host_key_pub.startswith("ecdsa-sha2-")
        connect(server).close()


# --- reachability ------------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(10)
def test_connection_refused(sshd_server: SSHServer) -> None:
    port = _closed_port()
    with pytest.raises(
        ConnectFailed, match=rf"cannot reach {sshd_server.user}@127\.0\.0\.1:{port}: connection refused"
    ):
        connect(sshd_server, port=port)


@pytest.mark.timeout(30)
def test_unknown_host_name(sshd_server: SSHServer) -> None:
    with pytest.raises(ConnectFailed, match=r"cannot resolve no-such-host\.invalid"):
        connect(sshd_server, host="no-such-host.invalid")


@pytest.mark.timeout(10)
def test_no_ssh_banner_times_out(sshd_server: SSHServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog) but never speaks
        port = silent.getsockname()[1]
        with pytest.raises(ConnectFailed, match=f"cannot reach .*:{port}: SSH handshake failed"):
            SSHRunner.connect(endpoint(sshd_server, port=port), timeout=1, known_hosts=sshd_server.known_hosts_path)


# --- authentication ----------------------------------------------------------------------------------------------


def test_wrong_key_is_refused_naming_user_host_and_key(sshd_server: SSHServer, tmp_path: Path) -> None:
    make_key(tmp_path / "stranger")
    with pytest.raises(AuthFailed) as err:
        connect(sshd_server, key_path=str(tmp_path / "stranger"))
    message = str(err.value)
    assert f"{sshd_server.user}@127.0.0.1:{sshd_server.port} refused the login of user {sshd_server.user}" in message
    assert str(tmp_path / "stranger") in message


def test_wrong_user_is_refused(sshd_server: SSHServer) -> None:
    with pytest.raises(AuthFailed, match="refused the login of user nobody-here"):
        connect(sshd_server, user="nobody-here")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"garbage\n", "not a private key"),
        (None, "no such file"),
        ("pubkey", "not a private key"),
        ("encrypted", "it is encrypted .* ssh-add"),
    ],
)
def test_unusable_key_file(sshd_server: SSHServer, tmp_path: Path, content: bytes | str | None, reason: str) -> None:
    key = tmp_path / "key"
    if content == "pubkey":
        shutil.copy(f"{sshd_server.client_key_path}.pub", key)
    elif content == "encrypted":
        make_key(key, passphrase="secret")
    elif isinstance(content, bytes):
        key.write_bytes(content)
    with pytest.raises(AuthFailed, match=f"cannot use key {key}: {reason}"):
        connect(sshd_server, key_path=str(key))


def test_no_key_at_all(sshd_server: SSHServer) -> None:
    with pytest.raises(AuthFailed, match="no SSH key to offer"):
        connect(sshd_server, key_path=None)


def test_default_key_in_home(sshd_server: SSHServer, no_user_ssh: Path) -> None:
    (no_user_ssh / ".ssh").mkdir()
    shutil.copy(sshd_server.client_key_path, no_user_ssh / ".ssh" / "id_ed25519")
    connect(sshd_server, key_path=None).close()


@pytest.fixture
def ssh_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not shutil.which("ssh-agent"):
        pytest.fail("ssh-agent not installed (Debian: openssh-client; `./dev test` installs it)")
    sock = tmp_path / "agent.sock"
    # Without -D, ssh-agent returns once its socket is listening and prints the daemon's pid.
    started = subprocess.run(["ssh-agent", "-s", "-a", str(sock)], check=True, capture_output=True, text=True)
    pid = int(re.search(r"SSH_AGENT_PID=(\d+)", started.stdout).group(1))  # type: ignore[union-attr]
    monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
    yield
    os.kill(pid, signal.SIGTERM)


def test_agent_key(sshd_server: SSHServer, ssh_agent: None, tmp_path: Path) -> None:
    make_key(tmp_path / "decoy")  # the agent's first key is refused, the second accepted
    subprocess.run(["ssh-add", "-q", str(tmp_path / "decoy"), str(sshd_server.client_key_path)], check=True)
    connect(sshd_server, key_path=None).close()


def test_encrypted_identity_file_used_through_the_agent(
    sshd_server: SSHServer, ssh_agent: None, tmp_path: Path
) -> None:
    # The usual laptop: an encrypted IdentityFile whose key ssh-add has unlocked; IdentitiesOnly keeps the agent's
    # other keys out, but this one is used through the agent.
    key = tmp_path / "id_locked"
    shutil.copy(sshd_server.client_key_path, key)
    shutil.copy(f"{sshd_server.client_key_path}.pub", f"{key}.pub")
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", "secret", "-f", str(key)], check=True, capture_output=True)
    subprocess.run(["ssh-add", "-q", str(sshd_server.client_key_path)], check=True, capture_output=True)
    config = tmp_path / "config"
    config.write_text(f"Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n")
    r = SSHRunner.connect(
        endpoint(sshd_server, key_path=None), known_hosts=sshd_server.known_hosts_path, ssh_config=config
    )
    r.close()


def test_identities_only_keeps_the_agent_keys_out(sshd_server: SSHServer, ssh_agent: None, tmp_path: Path) -> None:
    subprocess.run(["ssh-add", "-q", str(sshd_server.client_key_path)], check=True, capture_output=True)
    make_key(tmp_path / "stranger")
    config = tmp_path / "config"
    no_key = endpoint(sshd_server, key_path=None)
    config.write_text(f"Host *\n  IdentityFile {tmp_path / 'stranger'}\n")
    SSHRunner.connect(no_key, known_hosts=sshd_server.known_hosts_path, ssh_config=config).close()  # agent's key
    config.write_text(f"Host *\n  IdentityFile {tmp_path / 'stranger'}\n  IdentitiesOnly yes\n")
    with pytest.raises(AuthFailed) as err:
        SSHRunner.connect(no_key, known_hosts=sshd_server.known_hosts_path, ssh_config=config)
    assert "agent key" not in str(err.value)


# --- ~/.ssh/config -----------------------------------------------------------------------------------------------


def _alias_config(server: SSHServer, path: Path, extra: str = "") -> Path:
    path.write_text(
        f"Host gpu1\n  HostName 127.0.0.1\n  Port {server.port}\n  User {server.user}\n"
        f"  IdentityFile {path.parent / 'not-there'}\n  IdentityFile {server.client_key_path}\n{extra}"
    )
    return path


def test_config_alias(sshd_server: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURST_SSH_CONFIG", str(_alias_config(sshd_server, tmp_path / "config")))
    r = SSHRunner.connect(Endpoint(host="gpu1"), known_hosts=sshd_server.known_hosts_path)
    assert r.description == f"{sshd_server.user}@gpu1:{sshd_server.port}"
    assert run(r, ["echo", "hi"]).stdout == b"hi\n"
    r.close()


def test_endpoint_fields_win_over_config(sshd_server: SSHServer, tmp_path: Path) -> None:
    config = _alias_config(sshd_server, tmp_path / "config")

    def connect_gpu1(**changes: Any) -> None:
        gpu1 = Endpoint(host="gpu1", **changes)
        SSHRunner.connect(gpu1, known_hosts=sshd_server.known_hosts_path, ssh_config=config).close()

    with pytest.raises(AuthFailed, match="user nobody-here"):
        connect_gpu1(user="nobody-here")
    port = _closed_port()
    with pytest.raises(ConnectFailed, match=f"gpu1:{port}: connection refused"):
        connect_gpu1(port=port)
    # Like ssh -i: the endpoint's key comes first (a broken one is an error), the IdentityFile keys after it.
    (tmp_path / "broken").write_text("garbage")
    with pytest.raises(AuthFailed, match=r"cannot use key .*broken"):
        connect_gpu1(key_path=str(tmp_path / "broken"))
    make_key(tmp_path / "stranger")
    connect_gpu1(key_path=str(tmp_path / "stranger"))
    connect_gpu1()


def test_known_hosts_from_config(sshd_server: SSHServer, tmp_path: Path) -> None:
    extra = f"  UserKnownHostsFile {sshd_server.known_hosts_path}\n"
    config = _alias_config(sshd_server, tmp_path / "config", extra)
    SSHRunner.connect(Endpoint(host="gpu1"), ssh_config=config).close()


def test_proxy_command(sshd_server: SSHServer, tmp_path: Path) -> None:
    # The jump goes through the same sshd (direct-tcpip to itself), as a bastion would.
    hop = " ".join(sshd_server.ssh_argv()[:-1])  # the ssh options, without user@host
    extra = f"  ProxyCommand {hop} -W %h:%p {sshd_server.user}@127.0.0.1\n"
    config = _alias_config(sshd_server, tmp_path / "config", extra)
    before = sshd_server.connections_seen()
    r = SSHRunner.connect(Endpoint(host="gpu1"), known_hosts=sshd_server.known_hosts_path, ssh_config=config)
    assert run(r, ["echo", "via proxy"]).stdout == b"via proxy\n"
    r.close()
    assert sshd_server.connections_seen() - before == 2  # the hop's and ours inside it


def test_proxy_jump(sshd_server: SSHServer, tmp_path: Path) -> None:
    extra = (
        "  ProxyJump bastion\n"
        f"Host bastion\n  HostName 127.0.0.1\n  Port {sshd_server.port}\n  User {sshd_server.user}\n"
        f"  IdentityFile {sshd_server.client_key_path}\n  UserKnownHostsFile {sshd_server.known_hosts_path}\n"
        "  BatchMode yes\n"
    )
    config = _alias_config(sshd_server, tmp_path / "config", extra)
    before = sshd_server.connections_seen()
    r = SSHRunner.connect(Endpoint(host="gpu1"), known_hosts=sshd_server.known_hosts_path, ssh_config=config)
    assert run(r, ["echo", "jumped"]).stdout == b"jumped\n"
    r.close()
    assert sshd_server.connections_seen() - before == 2  # the bastion's and ours inside it


@pytest.mark.timeout(10)  # well below the connect timeout: the proxy's exit must end the handshake at once
def test_failing_proxy_command(sshd_server: SSHServer, tmp_path: Path) -> None:
    extra = "  ProxyCommand echo 'bastion: no route to host' >&2; sleep 0.3\n"
    config = _alias_config(sshd_server, tmp_path / "config", extra)
    with pytest.raises(ConnectFailed, match=r"cannot reach .*gpu1.*proxy command: bastion: no route to host"):
        SSHRunner.connect(Endpoint(host="gpu1"), known_hosts=sshd_server.known_hosts_path, ssh_config=config)


# --- losing the connection ---------------------------------------------------------------------------------------


def _read_until_lost(proc: RemoteProcess) -> None:
    """Read a command that never ends by itself until the runner reports the lost connection."""
    while proc.read():
        pass


TICKER = [PY, "-u", "-c", "import time\nwhile True: print('tick'); time.sleep(0.2)"]


@pytest.mark.timeout(20)
def test_killed_connection_ends_a_blocked_read(fresh_sshd: SSHServer) -> None:
    r = connect(fresh_sshd)
    proc = r.start(TICKER)
    assert proc.read().startswith(b"tick")
    assert kill_connections(fresh_sshd) == 1
    with pytest.raises(ConnectFailed, match=f"lost the SSH connection to .*:{fresh_sshd.port}"):
        _read_until_lost(proc)
    with pytest.raises(ConnectFailed):
        proc.wait(5)
    assert not r.is_active()
    with pytest.raises(ConnectFailed):
        r.start(["true"])
    r.close()
    # The daemon itself lives on.
    connect(fresh_sshd).close()


@pytest.mark.timeout(20)
def test_proxy_reset_ends_a_blocked_read(sshd_server: SSHServer, tmp_path: Path) -> None:
    proxy = TcpProxy(sshd_server.port)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{proxy.port} {sshd_server.host_key_pub}\n")
    r = connect(sshd_server, port=proxy.port, known_hosts=known_hosts)
    proc = r.start(["cat"])  # prints nothing: the read blocks until the connection goes
    reader_error: list[BaseException] = []

    def read() -> None:
        try:
            _read_until_lost(proc)
        except BaseException as exc:
            reader_error.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    proxy.drop_all()
    reader.join()
    assert isinstance(reader_error[0], ConnectFailed)
    r.close()
    proxy.close()


@pytest.mark.timeout(30)
def test_dead_network_is_noticed_by_keepalives(sshd_server: SSHServer, tmp_path: Path) -> None:
    proxy = TcpProxy(sshd_server.port)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{proxy.port} {sshd_server.host_key_pub}\n")
    config = tmp_path / "config"
    config.write_text("Host *\n  ServerAliveInterval 1\n  ServerAliveCountMax 2\n")
    r = SSHRunner.connect(endpoint(sshd_server, port=proxy.port), known_hosts=known_hosts, ssh_config=config)
    proc = r.start(["cat"])
    proc.write(b"before\n")
    assert read_line(proc) == b"before\n"
    proxy.blackhole()  # from now on nothing arrives and nothing says so
    with pytest.raises(ConnectFailed, match="no answer to keepalives for 2s"):
        _read_until_lost(proc)
    assert not r.is_active()
    r.close()
    proxy.close()


@pytest.mark.timeout(20)
def test_idle_connection_survives_keepalives(sshd_server: SSHServer, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host *\n  ServerAliveInterval 1\n  ServerAliveCountMax 1\n")
    r = SSHRunner.connect(endpoint(sshd_server), known_hosts=sshd_server.known_hosts_path, ssh_config=config)
    proc = r.start(["sleep", "3.5"])  # three keepalive rounds, each answered within its 1 s
    assert proc.read() == b""
    assert proc.wait(5) == 0
    assert r.is_active()
    r.close()
