"""The client side of the agent protocol (see agent.py): start a job, follow its event log, fetch results, end it.

Blocking, used from worker threads. There is one :class:`AgentClient` per job directory (``Connections.agent``),
shared by the job's lifecycle and its provider: on the happy path a whole job (upload, stream, results and
destroy) is one command on one connection, because the provider's terminate reuses the job's open front.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from . import agent
from .errors import ProviderError, RemoteSetupError, SyncError, UnsafeResults
from .runner import RemoteProcess, Runner, run

if TYPE_CHECKING:
    from .connections import Connections
    from .providers.base import Endpoint

__all__ = ["AGENT_SOURCE", "AgentClient", "AgentStream", "Record"]

AGENT_SOURCE: bytes = Path(agent.__file__).read_bytes()
# The longest record line accepted from an instance. The agent's own lines stay far below it (output is cut into
# 64 Ki-character records; a cell's display data is bounded); a longer one is a hostile or broken instance.
MAX_LINE = 8 << 20

Record = dict[str, Any]
T = TypeVar("T")


class _Exact:
    """``read(n)`` returns exactly n bytes (fewer only at EOF), as agent.ChunkedReader expects."""

    def __init__(self, head: bytes, proc: RemoteProcess) -> None:
        self.buf = head
        self.proc = proc

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.proc.read(max(n - len(self.buf), 65536))
            if not chunk:
                break
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def readline(self) -> bytes:
        while b"\n" not in self.buf and len(self.buf) <= MAX_LINE:
            chunk = self.proc.read()
            if not chunk:
                break
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line[:MAX_LINE]


class AgentStream:
    """A running ``run``/``attach``: event-log records, then the results, then (optionally) ``destroy``.

    ``offset`` is the byte offset of the event log this client has fully received; re-attaching there loses
    and repeats nothing.
    """

    def __init__(self, proc: RemoteProcess, offset: int, where: str, client: AgentClient | None = None) -> None:
        self._proc = proc
        self.offset = offset
        self._where = where
        self._client = client  # set for a `run`: told when the agent never started, so nothing is there to end
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._rest: _Exact | None = None
        self.exit: Record | None = None
        self.results_read = False

    def send(self, line: str) -> None:
        """A control line to the agent (``lease`` or ``stop REASON``). Safe beside a reading thread."""
        with self._lock:
            self._proc.write(line.encode() + b"\n")

    def records(self) -> Iterator[Record]:
        """Yield log records until the results marker or EOF (a dropped connection, or the agent died).

        The instance is not trusted: a line longer than :data:`MAX_LINE` (a stream with no newline) or one that
        is not a JSON object raises :class:`UnsafeResults` instead of growing a buffer. Each byte is scanned
        once and the consumed lines are dropped once per read, so a flood costs linear time."""
        scanned = 0
        while True:
            nl = self._buf.find(b"\n", scanned)
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    raise UnsafeResults(f"{self._where} sent a record longer than {MAX_LINE} bytes; nothing of it "
                                        "was used")
                scanned = len(self._buf)
                chunk = self._proc.read(65536)
                if not chunk:
                    self._check_startup_failure()
                    return  # the caller re-attaches at self.offset
                self._buf += chunk
                continue
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            scanned = 0
            record = _parse(line, self._where)
            if record.get("k") == agent.Kind.RESULTS:
                self._rest = _Exact(bytes(self._buf), self._proc)
                self._buf = bytearray()
                return
            self.offset += len(line)
            if record.get("k") == agent.Kind.EXIT:
                self.exit = record
            yield record

    def _check_startup_failure(self) -> None:
        if self.offset or self.exit:
            return
        rc = self._proc.wait(timeout=5)
        err = self._proc.stderr().decode("utf-8", "replace").strip()
        if rc == 127:
            if self._client is not None:
                self._client.gone = True  # the shell found no Python: the job never made its directory
            raise RemoteSetupError(f"no Python 3 on {self._where} ({err.splitlines()[-1] if err else 'not found'})")
        if rc not in (None, 0) and err:
            if self._client is not None and "burst-agent: needs Python" in err:
                self._client.gone = True  # refused before anything ran: no job directory was made
            raise RemoteSetupError(f"the burst agent could not start on {self._where}: {err.splitlines()[-1]}")

    def read_results(self, consume: Callable[[IO[bytes]], T]) -> T:
        """Hand the results tar to ``consume`` (after ``records()`` ended at the results marker)."""
        if self._rest is None:
            raise SyncError(f"no results came from {self._where}")
        framed = agent.ChunkedReader(self._rest)
        value = consume(framed)  # type: ignore[arg-type]
        framed.drain()  # up to the end marker, whatever tar left unread
        self.results_read = True
        return value

    def destroy(self) -> bool:
        """On the same channel, once the results are read: end the job and remove its directory."""
        assert self._rest is not None
        self.send(agent.Control.DESTROY)
        reply = self._rest.readline()
        return reply.strip() == agent.record_line({"k": agent.Kind.GONE}).strip()

    def close(self) -> None:
        self._proc.close()


def _parse(line: bytes, where: str) -> Record:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise UnsafeResults(f"{where} sent a record that is not a JSON object: {line[:80]!r}")
    return record


class AgentClient:
    """Talks to the agent about one job directory (or, for ``list``, a root) on one endpoint."""

    def __init__(self, connections: Connections, endpoint: Endpoint, python: str, jobdir: str) -> None:
        self.connections = connections
        self.endpoint = endpoint
        self.python = python
        self.jobdir = jobdir
        self.front: AgentStream | None = None  # the job's run/attach command, while it is open
        self.gone = False  # the directory is removed (or was never made); job directories are never reused
        self._lock = threading.Lock()

    @property
    def runner(self) -> Runner:
        return self.connections.get(self.endpoint)

    def _argv(self, command: str, *args: str) -> list[str]:
        return [self.python, "-c", agent.BOOT, str(len(AGENT_SOURCE)), command, self.jobdir, *args]

    def _start(self, command: str, *args: str, send_source: bool = True) -> tuple[RemoteProcess, str]:
        runner = self.runner
        proc = runner.start(self._argv(command, *args))
        if send_source:
            proc.write(AGENT_SOURCE)
        return proc, runner.description

    def start(self, manifest: Record, write_bundle: Callable[[IO[bytes]], None]) -> AgentStream:
        """Create the job directory, upload the bundle, start the job detached; stream from offset 0."""
        proc, where = self._start("run", send_source=False)
        stream = AgentStream(proc, 0, where, self)
        try:
            # An interpreter that cannot run the agent exits before reading: a broken pipe anywhere here is
            # explained by its exit status and stderr, not by the pipe.
            proc.write(AGENT_SOURCE)
            payload = json.dumps(manifest).encode()
            proc.write(struct.pack(">I", len(payload)) + payload)
            framed = agent.ChunkWriter(proc.write)
            write_bundle(framed)  # type: ignore[arg-type]
            framed.close()
        except OSError as exc:
            stream._check_startup_failure()
            raise SyncError(f"upload to {where} failed: {exc}") from exc
        self._set_front(stream)
        return stream

    def attach(self, offset: int) -> AgentStream:
        proc, where = self._start("attach", str(offset))
        stream = AgentStream(proc, offset, where)
        self._set_front(stream)
        return stream

    def results(self) -> AgentStream:
        """Only the results of an ended job (its ``records()`` yields nothing, then ``read_results``)."""
        proc, where = self._start("results")
        return AgentStream(proc, 0, where)

    def _set_front(self, stream: AgentStream) -> None:
        with self._lock:
            old, self.front = self.front, stream
        if old is not None and old is not stream:
            old.close()

    def release(self) -> None:
        """Close the job's front command (the job itself, detached, is not touched)."""
        with self._lock:
            old, self.front = self.front, None
        if old is not None:
            old.close()

    def _call(self, command: str, *args: str, timeout: float = 60.0) -> str:
        runner = self.runner
        result = run(runner, self._argv(command, *args), input=AGENT_SOURCE, timeout=timeout)
        if result.returncode == 127:
            raise RemoteSetupError(f"no Python 3 on {runner.description}")
        if result.returncode not in (0, 1):
            err = result.stderr.decode("utf-8", "replace").strip()
            raise RemoteSetupError(f"burst agent {command} failed on {runner.description}: {err}")
        return result.stdout.decode("utf-8", "replace")

    def stop(self, reason: str) -> None:
        self._call("stop", reason)

    def destroy(self) -> bool:
        """Stop the job, remove its directory and links. True once nothing is left.

        Uses the job's own front when its results have been read (no second command), else a new command."""
        if self.gone:
            return True
        front = self.front
        gone = False
        if front is not None and front.results_read:
            try:
                gone = front.destroy()
            except (OSError, EOFError, ProviderError):
                gone = False  # the front broke: ask again on a new command below
            self.release()
        if not gone:
            gone = self._call("destroy").strip() == agent.Kind.GONE
        self.gone = gone
        return gone

    def status(self) -> Record:
        if self.gone:
            return {"exists": False}
        out = self._call("status")
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {"exists": False}

    def list(self, tag: str) -> list[Record]:
        """Jobs under ``self.jobdir`` (a root folder) that carry ``tag``."""
        return [json.loads(line) for line in self._call("list", tag).splitlines() if line.strip()]

