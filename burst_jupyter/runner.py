"""Runner: start a command on an instance with pipes to it. SSH (paramiko) and a local subprocess twin.

Everything the job moves (agent, files, variables, the event stream, results) goes through the pipes of
commands started here, so one SSH connection carries a whole job. Runners are blocking; the job calls them
from worker threads.
"""

from __future__ import annotations

import io
import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MAX_ANSWER", "Completed", "ErrorTail", "LocalRunner", "RemoteProcess", "Runner"]

# The most a short command's stdout may hold (an agent's ``status``, ``list``, ``destroy``), and how much of any
# command's stderr is kept (its last lines explain a failure). An instance is not trusted to stop talking.
MAX_ANSWER = 8 << 20
_ERROR_TAIL = 64 * 1024


class RemoteProcess(Protocol):
    """A running command. ``read`` returns ``b""`` at end of stdout. Thread-safe between one reader and one
    writer (the job streams on one thread and renews the lease from another)."""

    def write(self, data: bytes) -> None: ...

    def close_stdin(self) -> None: ...

    def read(self, n: int = 65536) -> bytes: ...

    def stderr(self) -> bytes:
        """What the command wrote to stderr (complete once it has exited)."""
        ...

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or ``None`` if still running after ``timeout``."""
        ...

    def close(self) -> None:
        """Drop the pipes (and, for SSH, the channel). The command itself may live on."""
        ...


@dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


class Runner(Protocol):
    description: str

    def start(self, argv: Sequence[str]) -> RemoteProcess: ...

    def close(self) -> None: ...


class ErrorTail:
    """The last bytes a command wrote to stderr: fed by a draining thread, bounded whatever the command writes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        if len(self._buf) > 2 * _ERROR_TAIL:
            del self._buf[:-_ERROR_TAIL]

    def value(self) -> bytes:
        return bytes(self._buf[-_ERROR_TAIL:])


def run(runner: Runner, argv: Sequence[str], *, input: bytes = b"", timeout: float = 60.0) -> Completed:
    """Run a short command to completion through any runner. An answer over :data:`MAX_ANSWER` bytes is an
    ``OSError``: nothing that long is a short command's answer."""
    proc = runner.start(argv)
    try:
        if input:
            proc.write(input)
        proc.close_stdin()
        chunks = []
        size = 0
        while chunk := proc.read():
            size += len(chunk)
            if size > MAX_ANSWER:
                raise OSError(f"{runner.description} answered with more than {MAX_ANSWER} bytes")
            chunks.append(chunk)
        rc = proc.wait(timeout)
        return Completed(-1 if rc is None else rc, b"".join(chunks), proc.stderr())
    finally:
        proc.close()


class _LocalProcess:
    def __init__(self, argv: Sequence[str], cwd: str | None, env: dict[str, str] | None) -> None:
        self._p = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            # Its own session, so the kernel's process-group signals (Ctrl-C, shutdown) miss it: the job's own
            # agent detaches anyway, and the front command must not die mid-stream on an interrupt.
            start_new_session=True,
        )
        self._err = ErrorTail()
        self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._err_thread.start()

    def _drain_stderr(self) -> None:
        assert isinstance(self._p.stderr, io.BufferedReader)
        while chunk := self._p.stderr.read1(65536):
            self._err.feed(chunk)

    def write(self, data: bytes) -> None:
        assert self._p.stdin is not None
        self._p.stdin.write(data)
        self._p.stdin.flush()

    def close_stdin(self) -> None:
        if self._p.stdin and not self._p.stdin.closed:
            try:
                self._p.stdin.close()
            except BrokenPipeError:
                pass

    def read(self, n: int = 65536) -> bytes:
        assert isinstance(self._p.stdout, io.BufferedReader)
        return self._p.stdout.read1(n)

    def stderr(self) -> bytes:
        self._err_thread.join(timeout=5)
        return self._err.value()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self.close_stdin()
        if self._p.poll() is None:
            self._p.kill()
            self._p.wait()
        if self._p.stdout:
            self._p.stdout.close()


class LocalRunner:
    """Runs commands on this machine as subprocesses: the ``local`` provider's transport."""

    description = "local"

    def __init__(self, *, cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        self._cwd = cwd
        self._env = env if env is None else {**os.environ, **env}

    def start(self, argv: Sequence[str]) -> RemoteProcess:
        return _LocalProcess(argv, self._cwd, self._env)

    def close(self) -> None:
        pass
