"""The client side of the agent protocol (see agent.py): start a job, follow its event log, fetch results.

Blocking, used from worker threads. One :class:`AgentClient` per (runner, job directory).
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import agent
from .errors import RemoteSetupError, SyncError
from .runner import RemoteProcess, Runner, run

__all__ = ["AGENT_SOURCE", "AgentClient", "AgentStream", "Record"]

AGENT_SOURCE: bytes = Path(agent.__file__).read_bytes()

Record = dict[str, Any]
_CHUNK = 1 << 20


class _ChunkWriter:
    """File-like sink that frames what tar writes as length-prefixed chunks (agent.ChunkedReader)."""

    def __init__(self, proc: RemoteProcess) -> None:
        self._proc = proc
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= _CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._proc.write(struct.pack(">I", len(self._buf)) + bytes(self._buf))
            self._buf.clear()

    def close(self) -> None:
        self.flush()
        self._proc.write(struct.pack(">I", 0))


class AgentStream:
    """A running ``run``/``attach``: event-log records, then the results tar.

    ``offset`` is the byte offset of the event log this client has fully received; re-attaching there loses
    and repeats nothing.
    """

    def __init__(self, proc: RemoteProcess, offset: int, where: str) -> None:
        self._proc = proc
        self.offset = offset
        self._where = where
        self._buf = b""
        self._lock = threading.Lock()
        self.exit: Record | None = None

    def send(self, line: str) -> None:
        """A control line to the agent (``lease`` or ``stop REASON``). Safe beside a reading thread."""
        with self._lock:
            self._proc.write(line.encode() + b"\n")

    def records(self) -> Iterator[Record]:
        """Yield log records until the results marker (the stream then holds the results tar) or EOF."""
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                chunk = self._proc.read(65536)
                if not chunk:
                    self._check_startup_failure()
                    return  # connection dropped (or agent died): the caller re-attaches at self.offset
                self._buf += chunk
                continue
            line, self._buf = self._buf[: nl + 1], self._buf[nl + 1 :]
            record: Record = json.loads(line)
            if record.get("k") == "results":
                return
            self.offset += len(line)
            if record.get("k") == agent.EXIT_KIND:
                self.exit = record
            yield record

    def _check_startup_failure(self) -> None:
        if self.offset or self.exit:
            return
        rc = self._proc.wait(timeout=5)
        err = self._proc.stderr().decode("utf-8", "replace").strip()
        if rc == 127:
            raise RemoteSetupError(f"no Python 3 on {self._where} ({err.splitlines()[-1] if err else 'not found'})")
        if rc not in (None, 0) and err:
            last = err.splitlines()[-1]
            raise RemoteSetupError(f"the burst agent could not start on {self._where}: {last}")

    def results(self) -> _ResultsReader:
        return _ResultsReader(self._buf, self._proc)

    def close(self) -> None:
        self._proc.close()


class _ResultsReader:
    """What is left of the stream after the results marker, as a file for ``tarfile.open(mode='r|')``."""

    def __init__(self, head: bytes, proc: RemoteProcess) -> None:
        self._head = head
        self._proc = proc

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data = self._head if n < 0 else self._head[:n]
            self._head = self._head[len(data) :]
            return data
        if n < 0:
            chunks = []
            while chunk := self._proc.read():
                chunks.append(chunk)
            return b"".join(chunks)
        return self._proc.read(n)


@dataclass
class AgentClient:
    runner: Runner
    python: str
    jobdir: str

    def _argv(self, command: str, *args: str) -> list[str]:
        return [self.python, "-c", agent.BOOT, str(len(AGENT_SOURCE)), command, self.jobdir, *args]

    def _start(self, command: str, *args: str) -> RemoteProcess:
        proc = self.runner.start(self._argv(command, *args))
        proc.write(AGENT_SOURCE)
        return proc

    def start(self, manifest: Record, write_bundle: Callable[[IO[bytes]], None]) -> AgentStream:
        """Create the job directory, upload the bundle, start the job detached; stream from offset 0."""
        proc = self._start("run")
        payload = json.dumps(manifest).encode()
        proc.write(struct.pack(">I", len(payload)) + payload)
        sink = _ChunkWriter(proc)
        try:
            write_bundle(sink)  # type: ignore[arg-type]
            sink.close()
        except OSError as exc:
            stream = AgentStream(proc, 0, self.runner.description)
            stream._check_startup_failure()
            raise SyncError(f"upload to {self.runner.description} failed: {exc}") from exc
        return AgentStream(proc, 0, self.runner.description)

    def results(self) -> AgentStream:
        """Only the results of an ended job (its ``records()`` yields nothing, then ``results()``)."""
        return AgentStream(self._start("results"), 0, self.runner.description)

    def attach(self, offset: int) -> AgentStream:
        proc = self._start("attach", str(offset))
        return AgentStream(proc, offset, self.runner.description)

    def _call(self, command: str, *args: str, timeout: float = 60.0) -> str:
        result = run(self.runner, self._argv(command, *args), input=AGENT_SOURCE, timeout=timeout)
        if result.returncode == 127:
            raise RemoteSetupError(f"no Python 3 on {self.runner.description}")
        if result.returncode not in (0, 1):
            err = result.stderr.decode("utf-8", "replace").strip()
            raise RemoteSetupError(f"burst agent {command} failed on {self.runner.description}: {err}")
        return result.stdout.decode("utf-8", "replace")

    def stop(self, reason: str) -> None:
        self._call("stop", reason)

    def destroy(self) -> bool:
        """Stop the job, remove its directory and links. True once nothing is left."""
        return self._call("destroy").strip() == "gone"

    def status(self) -> Record:
        out = self._call("status")
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {"exists": False}

    def list(self, tag: str) -> list[Record]:
        """Jobs under ``self.jobdir`` (a root folder) that carry ``tag``."""
        return [json.loads(line) for line in self._call("list", tag).splitlines() if line.strip()]

