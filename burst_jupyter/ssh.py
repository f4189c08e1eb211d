"""SSH transport: a :class:`~burst_jupyter.runner.Runner` over one paramiko connection.

Every ``start`` opens a new exec channel on the same connection, so a whole job (agent, files, variables, the
event stream, lease renewals) costs one TCP connection and one handshake. The connection behaves like the
user's ``ssh``: it reads ``~/.ssh/config`` (:mod:`burst_jupyter.ssh_config`), offers the same keys (key files,
then ssh-agent: :mod:`burst_jupyter.ssh_login`) and checks host keys against ``known_hosts``
(:mod:`burst_jupyter.known_hosts`), with trust-on-first-use only when the endpoint asks for it.

Import this module only when an SSH endpoint is used: it imports paramiko (and with it cryptography), which
would slow ``%load_ext`` down.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from .errors import ConfigError, ConnectFailed, ProviderError, flat_message
from .known_hosts import check_host_key, prefer_known_key_types, read_known_hosts
from .runner import ErrorTail, RemoteProcess
from .ssh_config import SSHTarget, resolve_target
from .ssh_login import authenticate

if TYPE_CHECKING:
    from .providers.base import Endpoint

__all__ = ["SSHRunner"]

# The window is how much the server may send before we acknowledge. Paramiko's (and OpenSSH's) 2 MiB caps one
# channel at 20 MiB/s on a 100 ms link to a far-away GPU; 8 MiB allows 80 MiB/s, about what paramiko decrypts
# (~145 MiB/s on loopback, 2026-05), and costs memory only while a reader falls behind.
_WINDOW_SIZE = 8 * 1024 * 1024
# Bound on how long a channel that ended oddly waits to learn whether its connection is dying.
_SETTLE_SECONDS = 1.0


class _ProxyCommand:
    """ProxyCommand as OpenSSH runs it: through /bin/sh, its stdin and stdout being the connection.

    A socketpair rather than paramiko.ProxyCommand's pipes: paramiko never notices that command's EOF and spins
    until its banner timeout, and a socket gives the transport real timeouts without select loops."""

    def __init__(self, command: str) -> None:
        self.sock, theirs = socket.socketpair()
        # A file, not a pipe, for its stderr: a chatty command can never block on it. Lives as long as the command.
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {command}"],
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=self._errors,
                start_new_session=True,  # like the job's own commands: the kernel's Ctrl-C must not cut the link
            )
        finally:
            theirs.close()

    def last_error(self) -> str:
        self._errors.seek(0)
        lines = self._errors.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"it exited with status {self._process.poll()}"

    def close(self) -> None:
        self.sock.close()  # ssh -W and nc exit at EOF; terminate covers commands that do not
        self._process.terminate()
        try:
            self._process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._errors.close()


class _SSHProcess:
    """One exec channel. stderr is drained by a thread of its own: it shares the channel's window with stdout, so
    an unread stderr would stall stdout once the window fills."""

    def __init__(self, runner: SSHRunner, channel: Any) -> None:
        self._runner = runner
        self._chan = channel
        self._closed_here = False
        self._err = ErrorTail()
        self._err_thread = threading.Thread(target=self._drain_stderr, name="burst-ssh-stderr", daemon=True)
        self._err_thread.start()

    def _drain_stderr(self) -> None:
        while chunk := self._chan.recv_stderr(65536):
            self._err.feed(chunk)

    def _check_connection(self) -> None:
        # The channel ended without the remote's EOF and not by our close(): most likely the connection died.
        if not self._chan.eof_received and not self._closed_here:
            self._runner._raise_if_lost()

    def write(self, data: bytes) -> None:
        # Not Channel.sendall: it re-slices the remaining bytes after every 32 KiB packet, which copies quadratically
        # (50 MiB took 18 s instead of 0.6 s). Slicing a memoryview copies nothing.
        view = memoryview(data)
        while view:
            try:
                sent: int = self._chan.send(view)  # as much as fits in one packet and the window
            except OSError as exc:  # paramiko: "Socket is closed", once the command or the connection has gone
                self._check_connection()
                raise BrokenPipeError(f"the command on {self._runner.description} no longer reads stdin") from exc
            if sent == 0:  # paramiko's answer once close_stdin() has sent EOF
                raise BrokenPipeError(f"stdin of the command on {self._runner.description} is already closed")
            view = view[sent:]

    def close_stdin(self) -> None:
        try:
            self._chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the channel or the connection is gone: stdin is closed either way

    def read(self, n: int = 65536) -> bytes:
        data: bytes = self._chan.recv(n)
        if not data:
            self._check_connection()
        return data

    def stderr(self) -> bytes:
        self._err_thread.join(timeout=5)
        return self._err.value()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status; -1 when the command was killed by a signal (paramiko drops the signal's name)."""
        if not self._chan.status_event.wait(timeout):
            return None
        status: int = self._chan.exit_status
        if status == -1:
            self._check_connection()
        return status

    def close(self) -> None:
        self._closed_here = True
        try:
            self._chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # paramiko tells the server on a connection that is already dying: the channel is gone anyway


class SSHRunner:
    """Runs commands on one host through one SSH connection.

    Build it with :meth:`connect`. ``start`` is thread-safe; each process it returns may be used by one reader
    and one writer thread at once. A connection that drops (or stops answering keepalives) makes blocked reads
    and waits raise :class:`ConnectFailed`; it is not re-established here.

    Example:
        runner = SSHRunner.connect(Endpoint(host="gpu1", user="alice"))
        try:
            print(run(runner, ["nvidia-smi", "-L"]).stdout)
        finally:
            runner.close()
    """

    description: str

    def __init__(
        self,
        transport: Any,
        *,
        description: str,
        timeout: float,
        alive: tuple[int, int],
        proxy: _ProxyCommand | None,
    ) -> None:
        self.description = description
        self._transport = transport
        self._proxy = proxy
        self._timeout = timeout
        self._closed = threading.Event()
        self._lost_reason: str | None = None
        interval, count_max = alive
        if interval > 0:
            threading.Thread(
                target=self._keep_alive, args=(interval, count_max), name="burst-ssh-keepalive", daemon=True
            ).start()

    @classmethod
    def connect(
        cls,
        endpoint: Endpoint,
        *,
        timeout: float = 20.0,
        known_hosts: Path | None = None,
        ssh_config: Path | None = None,
    ) -> SSHRunner:
        """Connect, check the host key, log in.

        ``ssh_config`` defaults to ``$BURST_SSH_CONFIG``, else ``~/.ssh/config``; ``known_hosts`` to the config's
        first UserKnownHostsFile, else ``~/.ssh/known_hosts``. ``timeout`` bounds each step (TCP connect, SSH
        handshake, each login attempt).

        Raises :class:`ConnectFailed` (unreachable), :class:`HostKeyError` (unknown or changed host key),
        :class:`AuthFailed` (no key accepted, or a key file that cannot be used), :class:`ConfigError` (a broken
        ssh config).
        """
        if endpoint.host is None:
            raise ConfigError("the local endpoint needs no SSH connection; use LocalRunner")
        target = resolve_target(endpoint, ssh_config, known_hosts)
        known = read_known_hosts(target)
        proxy = _ProxyCommand(target.proxy_command) if target.proxy_command else None
        try:
            sock = proxy.sock if proxy else _open_socket(target, timeout)
            transport = paramiko.Transport(sock, default_window_size=_WINDOW_SIZE)
        except BaseException:
            if proxy:
                proxy.close()
            raise
        try:
            prefer_known_key_types(transport, known)
            transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout
            try:
                transport.start_client(timeout=timeout)
                # start_client returns quietly when its timeout runs out; then there is no host key yet.
                host_key = transport.get_remote_server_key()
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if transport.is_active():
                    detail = f"no answer within {timeout:g}s"
                else:
                    detail = f"proxy command: {proxy.last_error()}" if proxy else flat_message(exc)
                raise ConnectFailed(f"cannot reach {target}: SSH handshake failed ({detail})") from exc
            check_host_key(host_key, target, known, endpoint.trust_on_first_use)
            authenticate(transport, target)
        except BaseException:
            transport.close()
            if proxy:
                proxy.close()
            raise
        return cls(
            transport,
            description=str(target),
            timeout=timeout,
            alive=(target.alive_interval, target.alive_count_max),
            proxy=proxy,
        )

    def start(self, argv: Sequence[str]) -> RemoteProcess:
        """Run ``argv`` through the remote login shell on a new channel of this connection."""
        try:
            channel = self._transport.open_session(timeout=self._timeout)
        except paramiko.ChannelException as exc:
            # sshd allows MaxSessions (default 10) open channels per connection.
            raise ProviderError(f"{self.description} refused a new SSH channel: {exc.text}") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._raise_if_lost()
            raise ConnectFailed(f"cannot open an SSH channel to {self.description}: {flat_message(exc)}") from exc
        try:
            channel.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            channel.close()
            self._raise_if_lost()
            raise ProviderError(f"{self.description} refused to run {argv[0]!r}: {flat_message(exc)}") from exc
        return _SSHProcess(self, channel)

    def is_active(self) -> bool:
        """False once the connection has dropped, timed out on keepalives, or been closed."""
        return bool(self._transport.is_active())

    def _raise_if_lost(self) -> None:
        if self._transport.is_active():
            # paramiko closes a dying connection's channels a moment before it marks the connection inactive.
            self._transport.join(_SETTLE_SECONDS)
        if self._transport.is_active():
            return
        if self._lost_reason is None:
            cause = self._transport.saved_exception  # what ended paramiko's reader thread, None after close()
            if cause is None:
                self._lost_reason = "the runner was closed"
            elif isinstance(cause, EOFError):
                self._lost_reason = "closed by the remote end"
            else:
                self._lost_reason = flat_message(cause)
        raise ConnectFailed(f"lost the SSH connection to {self.description}: {self._lost_reason}")

    def close(self) -> None:
        """Close the connection and every channel on it. Idempotent."""
        self._closed.set()
        self._transport.close()
        if self._proxy:
            self._proxy.close()

    def _keep_alive(self, interval: int, count_max: int) -> None:
        # paramiko's own set_keepalive sends without asking for a reply, so it keeps NAT mappings open but never
        # notices a dead network. This is OpenSSH's ServerAlive*: ask for a reply (sshd answers every global
        # request, if only with a failure) and give up when none came within interval * count_max.
        while not self._closed.wait(interval):
            give_up = threading.Timer(interval * count_max, self._give_up, args=(interval * count_max,))
            give_up.daemon = True
            give_up.start()
            try:
                self._transport.global_request("keepalive@openssh.com", wait=True)
            except (paramiko.SSHException, OSError, EOFError):
                return  # the connection broke while sending; its readers learn that from paramiko
            finally:
                give_up.cancel()
            if not self._transport.is_active():
                return

    def _give_up(self, seconds: int) -> None:
        self._lost_reason = f"no answer to keepalives for {seconds}s"
        self._transport.close()


def _open_socket(target: SSHTarget, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((target.hostname, target.port), timeout=timeout)
    except socket.gaierror as exc:
        raise ConnectFailed(f"cannot reach {target}: cannot resolve {target.hostname} ({exc.strerror})") from exc
    except TimeoutError as exc:
        raise ConnectFailed(f"cannot reach {target}: no answer within {timeout:g}s") from exc
    except ConnectionRefusedError as exc:
        raise ConnectFailed(f"cannot reach {target}: connection refused") from exc
    except OSError as exc:
        raise ConnectFailed(f"cannot reach {target}: {exc.strerror or flat_message(exc)}") from exc
    # Commands and replies are small writes; Nagle would hold each one back for the previous one's ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
