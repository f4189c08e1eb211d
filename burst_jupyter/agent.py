"""The remote agent: one stdlib-only file shipped with every job (Python >= 3.8 on the instance).

The client starts it through :data:`BOOT`, feeding this file's source on stdin, so nothing has to be installed
on the instance and client and agent never disagree on versions. Commands (``BOOT N CMD JOBDIR [ARG]``):

``run``       read a manifest and a tar bundle from stdin, stage mounts, start the job detached, then ``attach``
``attach``    stream event-log lines from a byte offset, then the results (rw changes + variables) as a
              chunk-framed tar; then wait for ``destroy`` on stdin (answered with a ``gone`` line) or hang-up
``results``   only the results
``stop``      ask the job to stop (reason in ARG)
``destroy``   stop everything, remove the links it made and the job directory; prints ``gone``
``status``    one JSON line: exists, running, exit record
``list``      JSON lines for every job directory under JOBDIR (a root) carrying tag ARG

``run`` forks (no new interpreter) a detached supervisor, which owns the event log, the lease and the deadline,
and which forks the cell (run with a ``burst`` helper) or execs the command. Once the cell has ended the supervisor
stays on as a watchdog until the client destroys the job. The dead-man's switch: when the client's lease lapses,
the job's own deadline passes or its money runs out (the manifest's rate and cap: see :class:`Money`; either
means the client failed to stop it, or is gone), the supervisor stops the cell,
uploads the results to the manifest's presigned URL when there is one, and ends the instance with the recipe the
provider declared (its instance-scoped key, read here, never sent by the client); without a recipe (ssh, local,
thunder) it removes the job's ``work/`` and keeps the results in the job directory for the client or a cleanup.
Files in the job directory:

    job.json values.pkl cell.py              what the client sent
    m/<i>/                                   the content of mount i; its remote path is a symlink to it
    work/                                    the cell's current directory
    events.jsonl                             the append-only event log (one JSON object per line)
    exit.json  values.out.pkl                written when the cell ends (values: only for --pull, write_values)
    lease  stop  supervisor.pid  links.json  control files
    agent.log                                the supervisor's own log (what the dead-man's switch did)

A kept machine is a job too. Its manifest's ``"machine": {"idle_seconds": N}`` makes the supervisor run one
persistent Python process (the kernel, :func:`kernel_main`) in place of a cell, replaced when it dies; the
machine stops itself after N seconds without a cell (Reason.IDLE, a lapse like the lease's). A cell sent to the
machine is a job of its own (``"on_machine": MACHINE_JOBDIR``) whose supervisor hands its pipes to the kernel
over ``kernel.sock``: the names one cell defines are there for the next. Its mounts may be kept on the machine
(``"keep": KEY``, in ``k/<KEY>``), so a cell uploads only what changed. See the protocol section for the files.

The event log is the single source of truth: a client that lost its connection re-attaches at the byte offset
it had reached, so no output is lost or doubled, and the exit status survives any disconnect.
"""

from __future__ import annotations

import codecs
import json
import os
import pickle
import re
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

# Read N bytes of agent source from stdin and run them as __main__: no file needs to exist on the instance.
BOOT = (
    "import sys;sys.version_info>=(3,8) or sys.exit('burst-agent: needs Python >= 3.8, found '"
    "+sys.version.split()[0]);exec(compile(sys.stdin.buffer.read(int(sys.argv[1])),'burst-agent','exec'),"
    "{'__name__':'__main__'})"
)


# -------------------------------------------------------------------------------------------------- protocol
# What client and agent say to each other, spelled once. The client imports these names from this module, as it
# imports the module already (its source is what BOOT runs; ChunkedReader frames the results both ways): this file
# runs alone on the instance, so it cannot take them from a module of its own.


class Kind:
    """A record's ``k``: a line of the event log (events.jsonl), or of the attach channel."""

    OUT = "out"  # s: stdout or stderr, d: the text
    STARTED = "started"  # pid: the cell's process
    PROGRESS = "progress"  # p: percent, m: a message (burst.progress in the cell)
    RESULT = "result"  # data: the cell's value, as display formats
    DISPLAY = "display"  # data: what the cell displayed (display(), a figure), in its place among the prints
    ERROR = "error"  # ename, evalue, tb: the cell raised
    NOTE = "note"  # m: a stop under way (STOPPING and the reason), or a step of the dead-man's switch
    SETUP_ERROR = "setup-error"  # m: the job could not be staged
    EXIT = "exit"  # rc, reason (a Reason): the log's last record
    # The attach channel's own lines, never in the log:
    RESULTS = "results"  # the chunk-framed results tar follows
    GONE = "gone"  # the answer to ``destroy``: the job directory is removed
    STILL_THERE = "still-there"


class Reason:
    """Why a job ended: an exit record's ``reason``. The stop reasons are also what ``stop REASON`` asks for."""

    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"  # the job's maximum duration is over
    LEASE = "lease"  # the client's lease lapsed: it went silent
    BUDGET = "budget"  # the money left is what ending the instance takes
    IDLE = "idle"  # a machine job ran no cell for its idle_seconds
    AGENT_DIED = "agent-died"  # the supervisor is gone without an exit record (written by an attach)
    STOPS = frozenset({CANCELLED, DEADLINE, LEASE, BUDGET, IDLE})


STOPPING = "stopping: "  # a NOTE's text while the cell is being stopped, followed by the Reason


class Control:
    """The client's lines to an ``attach`` (on its stdin)."""

    LEASE = "lease"  # renews the lease: the client is still there
    STOP = "stop"  # ``stop REASON``: stop the cell (a Reason of Reason.STOPS; anything else is a cancel)
    DESTROY = "destroy"  # once the results are in: remove the job, answered on the channel (GONE or STILL_THERE)


# A machine job (manifest ``"machine": {"idle_seconds": N}``) runs one persistent Python process, the kernel, in
# place of a cell; a cell job with ``"on_machine": MACHINE_JOBDIR`` runs its cell in that kernel, so the names one
# cell defines are there for the next. Files in the machine's job directory, besides a job's:
KERNEL_SOCKET = "kernel.sock"  # where the kernel listens for cells (mode 0600 in the 0700 job directory)
KERNEL_EXIT = "kernel.exit"  # {"pid", "rc", "signal", "t"}: the last kernel that died while the machine ran
KERNEL_PID = "kernel.pid"  # the kernel now running
BUSY = "busy"  # while a cell runs: that cell's job directory
ACTIVITY = "activity"  # touched at each cell's start and end: its mtime is when the machine last worked
STORES = "k"  # k/<KEY>/: a kept mount's files, reused by the machine's later cells (a mount's "keep": KEY)
KERNEL_DIED = "KernelDied"  # the ename of a cell's ERROR when the kernel died under it

LAPSE_ARCHIVE = "lapse-results.tar"  # what a lapse uploads to the result sink: the same tar ``results`` sends
VALUES_MAGIC = b"burst-values-1\n"  # the first line of values.out.pkl (write_values), the --pull variables


def record_line(record: dict[str, object]) -> bytes:
    """One record as a line of the log or the channel."""
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


# ----------------------------------------------------------------------------------------- limits, helpers

CELL_FILENAME = "<burst-cell>"  # a notebook cell's name in tracebacks; a file's cell goes by its path (cell_file)
_MAX_RECORD = 64 * 1024  # characters: huge writes are split so one log line stays small
_MAX_FRAME = 8 << 20  # bytes of one cell -> supervisor frame; a larger one means the pipe was written over
_MAX_DISPLAY = 512 * 1024  # characters of one display format of the cell's value (repr, HTML, a base64 image)
_MAX_TB_LINES = 200  # of a remote traceback: its last lines (the frame that raised)
_MAX_NOTE = 1000  # characters of a progress message
_GRACE_SIGINT = 3.0  # seconds a stopped cell gets to handle KeyboardInterrupt before SIGTERM
_GRACE_SIGTERM = 3.0
_WATCH_TICK = 0.5  # how often the watchdog looks at the lease once the cell has ended
_GPU_EVERY = 10.0  # how often a kept machine samples its GPUs' memory and use for its view
_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)  # between the tries of a lapse upload or self-destruct call
_HTTP_TIMEOUT = 60.0
# Seconds kept back beyond the provider's terminate when the job's money runs out with nobody stopping it: the
# watchdog's tick and the self-destruct call itself.
_MONEY_MARGIN = 1.0


def _now() -> float:
    return time.time()


def _write_json_atomic(path: str, obj: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str, default: object = None) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _pid_alive(pid: int) -> bool:
    # The client has its own (processes.py): this file imports nothing of the package, nor the package this file.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------- event log


class GpuWatch:
    """A kept machine's GPUs as nvidia-smi reports them (memory used of total, utilisation), sampled in a thread of
    their own every _GPU_EVERY seconds, so a slow nvidia-smi never delays the lease or the money. Each change goes
    into the machine's log as a PROGRESS record's message, which its view shows. No nvidia-smi: nothing."""

    def __init__(self) -> None:
        self.latest: str | None = None
        self._said: str | None = None
        if shutil.which("nvidia-smi"):
            threading.Thread(target=self._sample, name="burst-gpu", daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.latest = gpu_line()
            time.sleep(_GPU_EVERY)

    def records(self, t: float) -> list[dict[str, object]]:
        line = self.latest
        if line is None or line == self._said:
            return []
        self._said = line
        return [{"k": Kind.PROGRESS, "p": None, "m": line, "t": t}]


def gpu_line() -> str | None:
    """``GPU 3.1/24 GB 37%`` for each GPU nvidia-smi lists (at most 16), or None when it says nothing usable."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total,utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    shown = []
    for line in out.splitlines()[:16]:
        try:
            used, total, util = (float(x) for x in line.split(",")[:3])
        except ValueError:
            continue  # "[N/A]" on a GPU that does not report it
        shown.append("%.1f/%.0f GB %d%%" % (used / 1024, total / 1024, util))
    return ("GPU " + ", ".join(shown))[:_MAX_NOTE] if shown else None


class EventLog:
    """Append-only JSON lines. One ``os.write`` per batch on an O_APPEND descriptor, so readers only ever see
    whole lines followed, at worst, by a line still being written (they stop at the last newline)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, records: list[dict[str, object]]) -> None:
        if records:
            data = b"".join(record_line(r) for r in records)
            os.write(self.fd, data)


def _out_records(stream: str, text: str, t: float) -> list[dict[str, object]]:
    return [
        {"k": Kind.OUT, "s": stream, "d": text[i : i + _MAX_RECORD], "t": t}
        for i in range(0, len(text), _MAX_RECORD)
    ]


# ------------------------------------------------------------------------------------- cell -> supervisor
# Python-level writes of the cell (print, tracebacks, burst.progress) go through one framed pipe so stdout,
# stderr and progress keep their exact order. Frame: kind (1 byte) + length (4 bytes, big endian) + payload.

_FRAME = struct.Struct(">cI")


class FrameWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes) -> None:
        data = _FRAME.pack(kind, len(payload)) + payload
        with self.lock:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]


class FrameReader:
    """Frames out of the pipe's bytes. The buffer holds at most one frame (writers keep each under _MAX_FRAME),
    and consumed bytes are dropped once per feed, so a flood costs linear time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        if self.broken:
            return []
        self.buf += data
        frames: list[tuple[bytes, bytes]] = []
        pos = 0
        while len(self.buf) - pos >= _FRAME.size:
            kind, n = _FRAME.unpack_from(self.buf, pos)
            if n > _MAX_FRAME:
                # Not a frame any writer here makes (the cell wrote to the pipe itself): stop reading frames
                # rather than hold an unbounded one.
                self.broken, self.buf = True, bytearray()
                frames.append((b"e", b"burst: the cell wrote over its event pipe; its later prints are lost\n"))
                return frames
            if len(self.buf) - pos < _FRAME.size + n:
                break
            frames.append((kind, bytes(self.buf[pos + _FRAME.size : pos + _FRAME.size + n])))
            pos += _FRAME.size + n
        del self.buf[:pos]
        return frames


class _CellStream:
    """``sys.stdout``/``sys.stderr`` inside the cell: every write goes straight to the framed pipe."""

    def __init__(self, writer: FrameWriter, kind: bytes, name: str) -> None:
        self._writer, self._kind, self.name = writer, kind, name
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        # In pieces of at most _MAX_RECORD characters (never inside a character): one frame stays small and
        # the supervisor never has to hold a huge write whole.
        for i in range(0, len(text), _MAX_RECORD):
            self._writer.send(self._kind, text[i : i + _MAX_RECORD].encode("utf-8", "surrogateescape"))
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1 if self._kind == b"o" else 2


# ------------------------------------------------------------------------------------------------- cell


class BurstHelper:
    """The ``burst`` object a cell sees without importing anything."""

    def __init__(self, writer: FrameWriter, job_id: str, jobdir: str) -> None:
        self._writer = writer
        self.job_id = job_id
        self.jobdir = jobdir

    def progress(self, percent: float, message: str | None = None) -> None:
        """Report progress (0-100); it shows in the notebook's job view."""
        pct = max(0.0, min(100.0, float(percent)))
        payload = {"p": pct, "m": None if message is None else str(message)[:_MAX_NOTE]}
        self._writer.send(b"p", json.dumps(payload).encode())

    def __repr__(self) -> str:
        return "<burst helper for job %s>" % self.job_id


class RemoteShell:
    """Enough of ``get_ipython()`` for what IPython's transform_cell produces (``!cmd``, ``%pip``)."""

    def __init__(self, user_ns: dict[str, object]) -> None:
        self.user_ns = user_ns

    def system(self, cmd: str) -> int:
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not chunk:
                break
            sys.stdout.write(decoder.decode(chunk))
        sys.stdout.write(decoder.decode(b"", final=True))
        rc = proc.wait()
        self.user_ns["_exit_code"] = rc
        return rc

    def getoutput(self, cmd: str, split: bool = True, depth: int = 0) -> object:
        out = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
        text = out.decode("utf-8", "replace")
        return text.splitlines() if split else text

    def run_line_magic(self, name: str, line: str, _stack_depth: int = 1) -> object:
        if name == "pip":
            return self.system("%s -m pip %s" % (sys.executable, line))
        if name == "matplotlib":
            return None  # figures come back inline already (CellDisplays)
        raise NotImplementedError("%%%s is not available inside a remote burst cell" % name)

    def run_cell_magic(self, name: str, line: str, cell: str) -> object:
        raise NotImplementedError("%%%%%s is not available inside a remote burst cell" % name)


def _load_values(path: str) -> dict[str, bytes]:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)  # type: ignore[no-any-return]
    except FileNotFoundError:
        return {}


def _dump_value(value: object) -> bytes:
    try:
        return pickle.dumps(value, protocol=4)
    except Exception:
        try:
            import cloudpickle  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise
        return cloudpickle.dumps(value, protocol=4)  # type: ignore[no-any-return]


def write_values(path: str, table: dict[str, tuple[str, object]]) -> None:
    """The pulled variables, in a container the client reads without unpickling anything: a magic line, one
    JSON line ``{name: ["ok", size] | ["missing"] | ["error", why]}``, then each ``ok`` pickle in that order.
    The client unpickles only the names it asked for (variables.py ``unpack_pulled``)."""
    index: dict[str, list[object]] = {}
    blobs: list[bytes] = []
    for name, (status, payload) in table.items():
        if status == "ok":
            assert isinstance(payload, bytes)
            index[name] = ["ok", len(payload)]
            blobs.append(payload)
        else:
            index[name] = [status] if payload is None else [status, str(payload)[:_MAX_NOTE]]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(VALUES_MAGIC + json.dumps(index).encode() + b"\n")
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def _cell_filename(manifest: dict[str, object]) -> str:
    """What tracebacks call the cell: the file it was read from (``burst submit --file``), else CELL_FILENAME."""
    name = manifest.get("cell_file")
    return name[:_MAX_NOTE] if isinstance(name, str) and name else CELL_FILENAME


def _remote_traceback(exc: BaseException, filename: str) -> list[str]:
    """Python's own traceback of the cell's exception, from the cell's first frame: none of the agent's."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n").split("\n")


def cell_main(jobdir: str) -> int:
    """A one-off cell: this forked process runs it and ends."""
    manifest = _read_json(os.path.join(jobdir, "job.json"), {})
    assert isinstance(manifest, dict)
    writer = FrameWriter(int(os.environ["BURST_EVENT_FD"]))
    sys.stdout = _CellStream(writer, b"o", "<stdout>")
    sys.stderr = _CellStream(writer, b"e", "<stderr>")
    ns, _, displays = _cell_namespace(writer, str(manifest.get("job_id")), jobdir)
    return run_cell(jobdir, manifest, ns, writer, displays, _cell_filename(manifest))


def _cell_namespace(writer: FrameWriter, job_id: str, jobdir: str
                    ) -> tuple[dict[str, object], BurstHelper, CellDisplays]:
    """The namespace cells run in, as a notebook's: ``burst``, ``get_ipython()``, ``display``; figures inline."""
    import builtins

    ns: dict[str, object] = {"__name__": "__main__", "__builtins__": builtins}
    helper = BurstHelper(writer, job_id, jobdir)
    ns["burst"] = helper
    shell = RemoteShell(ns)
    ns["get_ipython"] = lambda: shell
    displays = CellDisplays(writer)
    ns["display"] = displays.display  # a builtin in a notebook too
    displays.install()
    sys.path.insert(0, os.getcwd())
    return ns, helper, displays


class _Interrupts:
    """SIGINT in the kernel: a KeyboardInterrupt in the cell while one runs, nothing between cells (the kernel
    outlives the stops of its cells). One that comes while a cell is being set up waits for its code to start."""

    def __init__(self) -> None:
        self.armed = False  # the cell's own code runs
        self.active = False  # a cell was taken (``busy`` names it)
        self.pending = False

    def handler(self, signum: int, frame: object) -> None:
        if self.armed:
            raise KeyboardInterrupt
        if self.active:
            self.pending = True

    def arm(self) -> None:
        self.armed = True
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def run_cell(jobdir: str, manifest: dict[str, object], ns: dict[str, object], writer: FrameWriter,
             displays: CellDisplays, filename: str, interrupts: _Interrupts | None = None) -> int:
    """Run the cell of ``jobdir`` in ``ns``: pushed values in, its last expression as RESULT, what it displays,
    its traceback, its pulled values out (values.out.pkl). The exit status: 0, 1, 130 (interrupted) or exit()'s."""
    import ast
    import linecache

    def report(exc: BaseException) -> None:
        tb = [line[:_MAX_RECORD // 16] for line in _remote_traceback(exc, filename)[-_MAX_TB_LINES:]]
        err = {"ename": type(exc).__name__[:_MAX_NOTE], "evalue": _safe_str(exc)[:_MAX_RECORD], "tb": tb}
        writer.send(b"x", json.dumps(err).encode())

    rc = 0
    try:
        try:
            if interrupts is not None:
                interrupts.arm()
            for name, blob in _load_values(os.path.join(jobdir, "values.pkl")).items():
                try:
                    ns[name] = pickle.loads(blob)
                except Exception as exc:
                    raise RuntimeError("pushed variable %r cannot be unpickled here: %s: %s"
                                       % (name, type(exc).__name__, exc)) from None
            with open(os.path.join(jobdir, "cell.py"), encoding="utf-8") as f:
                source = f.read()
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            tree = ast.parse(source, filename)
            last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            if last is not None:
                tree.body.pop()
            exec(compile(tree, filename, "exec"), ns)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), filename, "eval"), ns)
                if value is not None:
                    # What the notebook would show, as data: the value itself never travels back unasked.
                    writer.send(b"r", _display_payload(_display_data(value)))
            displays.show_figures()  # what is left open, after the value: as the inline backend does
        finally:
            if interrupts is not None:
                interrupts.armed = False
    except SystemExit as exc:
        code = exc.code
        rc = code if isinstance(code, int) else (0 if code is None else 1)
        if rc:
            report(exc)
    except KeyboardInterrupt as exc:
        report(exc)
        rc = 130
    except BaseException as exc:
        report(exc)
        rc = 1
    try:
        _save_pulls(jobdir, list(manifest.get("pull") or []), ns)  # type: ignore[call-overload]
    except Exception as exc:  # values.out.pkl could not be written: say so, as for the cell's own errors
        report(exc)
        rc = rc or 1
    return rc


# --------------------------------------------------------------------------------------------- the kernel
# A machine job's one persistent Python process. It takes one cell at a time on its unix socket: the cell's
# supervisor connects, the kernel says {"pid"} when it is free, the supervisor sends one JSON line {"jobdir"} with
# the write ends of the cell's stdout, stderr and frame pipes (SCM_RIGHTS), and the kernel answers {"rc"} once the
# cell has ended and those ends are closed.

_CELL_FDS = 3


def _listen(machine: str) -> Any:
    """The kernel's socket, bound by a relative name (AF_UNIX paths are short; job directories may not be)."""
    import socket

    here = os.getcwd()
    os.chdir(machine)
    try:
        try:
            os.unlink(KERNEL_SOCKET)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o177)
        try:
            listener.bind(KERNEL_SOCKET)
        finally:
            os.umask(mask)
        os.chmod(KERNEL_SOCKET, 0o600)
        listener.listen(16)
    finally:
        os.chdir(here)
    return listener


def _receive_cell(conn: Any) -> tuple[dict[str, object], list[int]]:
    """The cell's request and its three descriptors ({} and whatever came, if it is not one)."""
    import array
    import socket

    data, fds = b"", []  # type: ignore[var-annotated]
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    while b"\n" not in data and len(data) < 65536:
        chunk, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(_CELL_FDS * 4), flags)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if not chunk:
            break
        data += chunk
    try:
        request = json.loads(data.partition(b"\n")[0])
    except ValueError:
        request = None
    if not isinstance(request, dict) or not isinstance(request.get("jobdir"), str) or len(fds) != _CELL_FDS:
        return {}, fds
    return request, fds


def _touch(path: str) -> None:
    with open(path, "a"):
        pass
    os.utime(path)


def kernel_main(machine: str) -> int:
    """The machine's kernel: one namespace for all the cells it is sent, until it is killed."""
    manifest = _read_json(os.path.join(machine, "job.json"), {})
    assert isinstance(manifest, dict)
    own_frames = int(os.environ["BURST_EVENT_FD"])
    writer = FrameWriter(own_frames)
    own_stdout, own_stderr = _CellStream(writer, b"o", "<stdout>"), _CellStream(writer, b"e", "<stderr>")
    sys.stdout, sys.stderr = own_stdout, own_stderr
    own_fds = os.dup(1), os.dup(2)  # between cells, output goes to the machine's own log
    ns, helper, displays = _cell_namespace(writer, str(manifest.get("job_id")), machine)
    interrupts = _Interrupts()
    signal.signal(signal.SIGINT, interrupts.handler)
    listener = _listen(machine)
    listener.settimeout(1.0)
    supervisor = os.getppid()
    busy, activity = os.path.join(machine, BUSY), os.path.join(machine, ACTIVITY)
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # a timeout: is the machine's supervisor still there?
            if os.getppid() != supervisor:
                return 0  # it was killed (a destroy): nobody would read this process's output or stop it
            continue
        fds: list[int] = []
        try:
            conn.settimeout(30.0)
            conn.sendall(record_line({"pid": os.getpid()}))  # free: the cell may come
            request, fds = _receive_cell(conn)
            jobdir = str(request.get("jobdir"))
            cell = _read_json(os.path.join(jobdir, "job.json")) if request else None
            if not isinstance(cell, dict):
                continue  # the cell was stopped before it was sent (or it was not one)
            count += 1
            interrupts.active = True
            try:
                with open(busy + ".tmp", "w") as f:
                    f.write(jobdir)
                os.replace(busy + ".tmp", busy)
                _touch(activity)
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
                with writer.lock:
                    writer.fd = fds[2]
                helper.job_id, helper.jobdir = str(cell.get("job_id")), jobdir
                env = cell.get("env")
                os.environ.update({str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {})
                os.environ.update(BURST_JOB_ID=helper.job_id, BURST_JOBDIR=jobdir)
                # Each cell its own name: a traceback through a function an earlier cell defined shows its lines.
                filename = str(cell.get("cell_file") or "<burst-cell %d>" % count)[:_MAX_NOTE]
                rc = run_cell(jobdir, cell, ns, writer, displays, filename, interrupts)
            finally:
                sys.stdout, sys.stderr = own_stdout, own_stderr
                with writer.lock:
                    writer.fd = own_frames
                os.dup2(own_fds[0], 1)
                os.dup2(own_fds[1], 2)
                for fd in fds:
                    os.close(fd)
                fds = []
                interrupts.active = interrupts.pending = False
                try:
                    os.unlink(busy)
                except FileNotFoundError:
                    pass
                _touch(activity)
            conn.sendall(record_line({"rc": rc}))
        except OSError:
            pass  # the cell's supervisor is gone: nobody waits for the answer
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()


def _save_pulls(jobdir: str, names: list[str], ns: dict[str, object]) -> None:
    """Pickle each pulled variable on its own so one bad value does not hide the others."""
    if not names:
        return
    out: dict[str, tuple[str, object]] = {}
    for name in names:
        if name not in ns:
            out[name] = ("missing", None)
            continue
        try:
            out[name] = ("ok", _dump_value(ns[name]))
        except Exception as exc:
            out[name] = ("error", "%s: %s" % (type(exc).__name__, exc))
    write_values(os.path.join(jobdir, "values.out.pkl"), out)


def _safe_str(value: object, show: Callable[[object], str] = str) -> str:
    try:
        return str(show(value))
    except Exception as exc:
        return "<unrepresentable %s: %s>" % (type(value).__name__, exc)


# The display formats of a cell's value that travel back (as Jupyter writes them: text, images in base64, JSON as
# a value), and the method that gives each. Others (JavaScript, SVG) could act in the notebook: not sent. The
# client shows HTML in a sandboxed frame and Markdown with its raw HTML and script links taken out.
_DISPLAY_METHODS = (("text/html", "_repr_html_"), ("text/markdown", "_repr_markdown_"),
                    ("application/json", "_repr_json_"), ("image/png", "_repr_png_"), ("image/jpeg", "_repr_jpeg_"))


def _display_data(value: object, bundle: object = None) -> dict[str, object]:
    """What the notebook would show for ``value``: its repr and the display formats it offers, each bounded.
    ``bundle``: the formats already given (``display(..., raw=True)``)."""
    import base64

    data: dict[str, object] = {"text/plain": _safe_str(value, repr)}
    figure = _figure_png(value)
    if figure is not None:
        bundle = {"image/png": figure}
    elif bundle is None and hasattr(value, "_repr_mimebundle_"):
        try:
            bundle = value._repr_mimebundle_()
        except Exception:
            bundle = None
        if isinstance(bundle, tuple):
            bundle = bundle[0]
    for mime, method in _DISPLAY_METHODS:
        try:
            shown = bundle.get(mime) if isinstance(bundle, dict) else None
            if shown is None and hasattr(value, method):
                shown = getattr(value, method)()
        except Exception:
            continue
        if isinstance(shown, tuple):
            shown = shown[0]  # (data, metadata)
        if isinstance(shown, bytes):
            shown = base64.b64encode(shown).decode("ascii")
        if mime == "application/json" and shown is not None:
            try:
                size = len(json.dumps(shown))
            except (TypeError, ValueError):
                continue
            if size <= _MAX_DISPLAY:
                data[mime] = shown
        elif isinstance(shown, str) and len(shown) <= _MAX_DISPLAY:
            data[mime] = shown
    if isinstance(bundle, dict) and isinstance(bundle.get("text/plain"), str):
        data["text/plain"] = bundle["text/plain"]
    text = str(data["text/plain"])
    if len(text) > _MAX_RECORD:
        data["text/plain"] = text[:_MAX_RECORD] + "... (%d characters in all)" % len(text)
    return data


def _display_payload(data: dict[str, object]) -> bytes:
    """The bundle as one frame within half a frame's bound (its record line must fit the client's bound too, and
    JSON can spell one character in six): the biggest formats left out until it fits. Its text always stays."""
    while True:
        payload = json.dumps(data).encode()
        others = [mime for mime in data if mime != "text/plain"]
        if len(payload) <= _MAX_FRAME // 2 or not others:
            return payload
        del data[max(others, key=lambda mime: len(json.dumps(data[mime])))]


def _figure_png(value: object) -> bytes | None:
    """A matplotlib figure as the inline backend draws it; None for anything else (or a figure that fails to)."""
    figure = sys.modules.get("matplotlib.figure")
    if figure is None or not isinstance(value, figure.Figure):
        return None
    import io

    out = io.BytesIO()
    try:
        value.savefig(out, format="png", bbox_inches="tight")
    except Exception:
        return None
    return out.getvalue()


class CellDisplays:
    """What the cell displays, sent as it happens (one display bundle per object, in order with its prints):
    ``display()`` (a builtin here as in a notebook, and IPython's own once the cell imports IPython) and matplotlib
    figures, at ``plt.show()`` or left open at the cell's end, as the inline backend does. Neither IPython nor
    matplotlib is needed: nothing is imported until the cell imports them, and without them text is shown."""

    BACKEND = "burst_inline_figures"  # a module only in sys.modules: matplotlib loads it by name

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer

    def display(self, *objs: object, raw: bool = False, **_: object) -> None:
        for obj in objs:
            given = obj if raw and isinstance(obj, dict) else None
            self.writer.send(b"d", _display_payload(_display_data(obj, given)))

    def show_figures(self, *_: object, **__: object) -> None:
        """The inline backend's show(): every open figure, then closed (a figure is shown once)."""
        if "matplotlib.pyplot" not in sys.modules:
            return
        plt = sys.modules["matplotlib.pyplot"]
        for number in plt.get_fignums():
            self.display(plt.figure(number))
        plt.close("all")

    def install(self) -> None:
        sys.meta_path.insert(0, _AfterImport({
            "matplotlib": self._inline_figures,
            "IPython.core.display_functions": self._own_display,  # IPython >= 7.23
            "IPython.core.display": self._own_display,  # older IPython defines display() here
        }))

    def _own_display(self, module: Any) -> None:
        if hasattr(module, "display"):
            module.display = self.display

    def _inline_figures(self, matplotlib: Any) -> None:
        """Figures drawn into the notebook, unless the cell's environment asked for a backend of its own."""
        if os.environ.get("MPLBACKEND", "").lower() != "agg":
            return
        import importlib
        import types

        backend = types.ModuleType(self.BACKEND)
        # By name: the agent imports only the standard library, and this runs once the cell has matplotlib.
        backend.FigureCanvas = importlib.import_module("matplotlib.backends.backend_agg").FigureCanvasAgg  # type: ignore[attr-defined]
        backend.show = self.show_figures  # type: ignore[attr-defined]
        sys.modules[self.BACKEND] = backend
        matplotlib.rcParams["backend"] = "module://" + self.BACKEND


class _AfterImport:
    """A finder that runs ``hooks[name](module)`` once that module is imported, before its importer sees it."""

    def __init__(self, hooks: dict[str, Callable[[Any], None]]) -> None:
        self.hooks = hooks

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
                  ) -> ModuleSpec | None:
        then = self.hooks.pop(name, None)  # popped first: the find_spec below asks this finder too
        if then is None:
            return None
        import importlib.util

        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def run(module: ModuleType) -> None:
            exec_module(module)
            try:
                then(module)
            except Exception:  # the cell's import works as it would without burst
                pass

        loader.exec_module = run
        return spec


# ------------------------------------------------------------------------------------------------ money


def _decimal(value: object) -> Decimal | None:
    try:
        return None if value is None else Decimal(str(value))
    except InvalidOperation:
        return None


class Money:
    """The job's money as the instance sees it, from the manifest: the billed rate ($/h) and the cap (decimal
    strings), what earlier attempts spent, and the seconds this attempt had billed when the client wrote the
    manifest (``billed_seconds``); the agent adds its own wall-clock time since it read the manifest
    (``received_at``). No rate or no cap: nothing to hold."""

    def __init__(self, manifest: dict[str, object]) -> None:
        self.rate = _decimal(manifest.get("rate_usd_per_hour")) or Decimal(0)
        self.cap = _decimal(manifest.get("cap_usd"))
        self.spent = _decimal(manifest.get("spent_usd")) or Decimal(0)
        self.billed = float(manifest.get("billed_seconds") or 0.0)  # type: ignore[arg-type]
        self.since = float(manifest.get("received_at") or _now())  # type: ignore[arg-type]
        # The client's own budget stop comes this long before the cap; the end of the instance only takes this.
        self.stop_reserve = float(manifest.get("stop_reserve_seconds") or 0.0)  # type: ignore[arg-type]
        self.end_reserve = float(manifest.get("teardown_seconds") or 0.0) + _MONEY_MARGIN  # type: ignore[arg-type]

    def cost(self) -> Decimal:
        seconds = self.billed + max(_now() - self.since, 0.0)
        return self.spent + self.rate * Decimal(repr(seconds)) / 3600

    def seconds_left(self, reserve: float) -> float | None:
        """Seconds until only ``reserve`` seconds of money are left (0 once they are); None: nothing to hold."""
        if self.cap is None or self.rate <= 0:
            return None
        left = (self.cap - self.cost()) / self.rate * 3600 - Decimal(repr(reserve))
        return max(float(left), 0.0)

    def out(self, reserve: float) -> bool:
        left = self.seconds_left(reserve)
        return left is not None and left <= 0.0

    def describe(self) -> str:
        return "$%s of its $%s cap spent at $%s/h" % (self.cost().quantize(Decimal("0.0001")), self.cap, self.rate)


# ------------------------------------------------------------------------------------------- supervisor


class Supervisor:
    def __init__(self, jobdir: str) -> None:
        self.jobdir = jobdir
        manifest = _read_json(self.path("job.json"), {})
        assert isinstance(manifest, dict)
        self.manifest = manifest
        self.log = EventLog(self.path("events.jsonl"))
        self.money = Money(manifest)
        self.stop_reason: str | None = None
        self.stop_at: float | None = None
        self.lapsed: str | None = None  # LEASE, DEADLINE, BUDGET or IDLE when this supervisor decided the job ends
        self.proc: _Child | _KernelCell | None = None
        machine = manifest.get("machine")
        self.machine: dict[str, object] | None = machine if isinstance(machine, dict) else None
        self.idle = int(self.machine.get("idle_seconds") or 0) if self.machine else 0  # type: ignore[call-overload]
        on_machine = manifest.get("on_machine")
        self.on_machine: str | None = on_machine if isinstance(on_machine, str) and on_machine else None

    def path(self, *parts: str) -> str:
        return os.path.join(self.jobdir, *parts)

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop(Reason.CANCELLED))
        signal.signal(signal.SIGUSR1, lambda *_: None)  # `stop` wakes the select; the stop file says why
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Written only once the handlers are in place: a `stop` that finds the pid must not kill us.
        with open(self.path("supervisor.pid"), "w") as f:
            f.write(str(os.getpid()))
        if self.machine is not None:
            return self.run_machine(wake_r)
        started = time.monotonic()
        sel = selectors.DefaultSelector()
        if self.on_machine is not None:
            self.proc = _KernelCell.connect(self.jobdir, self.on_machine)
            if self.proc is None:
                _fail_setup(self.jobdir, "the machine at %s has no Python process (it has ended, or its process "
                                         "did not come back within %d s)" % (self.on_machine, _KERNEL_WAIT))
                return self.conclude(started)
            sel.register(self.proc.sock, selectors.EVENT_READ, "kernel")
        else:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            frame_r, frame_w = os.pipe()
            self.proc = self.spawn(self.child_env(frame_w), out_w, err_w, frame_w, cell_main)
            for fd in (out_w, err_w, frame_w):
                os.close(fd)
            self.proc.stdout_fd, self.proc.stderr_fd, self.proc.frames_fd = out_r, err_r, frame_r
            self.log.append([{"k": Kind.STARTED, "pid": self.proc.pid, "t": _now()}])
        decoders = {"stdout": codecs.getincrementaldecoder("utf-8")("replace"),
                    "stderr": codecs.getincrementaldecoder("utf-8")("replace")}
        frames = FrameReader()
        sel.register(self.proc.frames_fd, selectors.EVENT_READ, "frames")
        sel.register(self.proc.stdout_fd, selectors.EVENT_READ, "stdout")
        sel.register(self.proc.stderr_fd, selectors.EVENT_READ, "stderr")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        open_fds = 3
        deadline = float(self.manifest.get("deadline_seconds") or 0)  # 0: none
        lease = int(self.manifest.get("lease_seconds") or 0)
        exited_at: float | None = None
        while open_fds:
            timeout = 0.5 if exited_at is None else max(0.0, exited_at + 1.0 - time.monotonic())
            ready = sel.select(timeout)
            records: list[dict[str, object]] = []
            t = _now()
            for key, _ in ready:
                fd = key.fd
                if key.data == "wake":
                    os.read(fd, 512)
                    continue
                if key.data == "kernel":
                    assert isinstance(self.proc, _KernelCell)
                    records.extend(self.proc.receive(t))
                    if self.proc.closed:
                        sel.unregister(fd)
                    continue
                data = os.read(fd, 65536)
                if not data:
                    sel.unregister(fd)
                    open_fds -= 1
                    if key.data in decoders:
                        records.extend(_out_records(key.data, decoders[key.data].decode(b"", final=True), t))
                    continue
                if key.data == "frames":
                    records.extend(self.frame_records(frames.feed(data), t))
                else:
                    records.extend(_out_records(key.data, decoders[key.data].decode(data), t))
            self.log.append(_coalesce(records))
            if exited_at is None and self.proc.poll() is not None:
                exited_at = time.monotonic()
            if exited_at is not None and time.monotonic() > exited_at + 1.0:
                break  # a background child of the cell keeps the pipes open: stop waiting for it
            if self.stop_reason is None and exited_at is None:  # a cell that ended by itself ended so
                if os.path.exists(self.path("stop")):
                    with open(self.path("stop")) as f:
                        self.request_stop(f.read().strip() or Reason.CANCELLED)
                else:
                    self.lapsed = self.lapse_reason(started, deadline, lease)
                    if self.lapsed is not None:
                        self.request_stop(self.lapsed)
            self.escalate()
        rc = self.proc.wait()
        self.proc.reap()  # leftovers of the cell die with the job
        if isinstance(self.proc, _KernelCell) and self.proc.died:
            self.log.append([{"k": Kind.ERROR, "ename": KERNEL_DIED, "evalue": self.proc.death(), "tb": [],
                              "t": _now()}])
        if isinstance(self.proc, _KernelCell) and rc != 0 and self.stop_reason is None:
            # Stopped with its machine (the machine's cap, its idle limit, a `stop` of it): the cell ends so.
            self.stop_reason = _machine_stopping(self.proc.machine)
            if self.stop_reason is not None:
                self.log.append([{"k": Kind.NOTE, "m": "the machine was stopped (%s) while this cell ran"
                                  % self.stop_reason, "t": _now()}])
        reason = self.stop_reason or (Reason.OK if rc == 0 else Reason.ERROR)
        self.finish(rc, reason)
        return self.conclude(started)

    def conclude(self, started: float) -> int:
        """After the exit record: the watchdog, until the client destroys the job or the dead-man's switch fires."""
        deadline = float(self.manifest.get("deadline_seconds") or 0)
        lease = int(self.manifest.get("lease_seconds") or 0)
        # The cell is over: a machine shutting down simply ends the watchdog.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        uploaded = False
        if self.lapsed == Reason.BUDGET:
            # Stopped at the cap: a client may still fetch the results and end the instance; until only its end is
            # left of the money, wait for one (with the results in the sink first, while there is money for it).
            uploaded = self.upload_lapse_results()
            self.lapsed = None
        if self.lapsed is None:
            self.lapsed = self.watch(started, deadline, lease)
        if self.lapsed is not None:
            self.lapse(self.lapsed, lease, upload=not uploaded)
        return 0

    def child_env(self, frame_w: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.manifest.get("env") or {})
        env.update(BURST_JOB_ID=str(self.manifest.get("job_id")), BURST_JOBDIR=self.jobdir,
                   BURST_EVENT_FD=str(frame_w), PYTHONUNBUFFERED="1")
        env.setdefault("MPLBACKEND", "Agg")  # no display on an instance
        return env

    def run_machine(self, wake_r: int) -> int:
        """A machine job: its kernel runs until the machine is stopped, lapses or goes idle; a kernel that dies
        meanwhile is replaced (its cell, if any, reports the death). What the kernel writes between cells is the
        machine's own output."""
        _touch(self.path(ACTIVITY))
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        frame_r, frame_w = os.pipe()
        env = self.child_env(frame_w)
        # The write ends stay open here, for the kernels to come: the loop ends on a stop, not on EOF.
        self.proc = self.spawn_kernel(env, out_w, err_w, frame_w)
        records: list[dict[str, object]] = [{"k": Kind.STARTED, "pid": self.proc.pid, "t": _now()}]
        self.log.append(records)
        sel = selectors.DefaultSelector()
        decoders = {"stdout": codecs.getincrementaldecoder("utf-8")("replace"),
                    "stderr": codecs.getincrementaldecoder("utf-8")("replace")}
        frames = FrameReader()
        for fd, name in ((frame_r, "frames"), (out_r, "stdout"), (err_r, "stderr")):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, name)
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        started = time.monotonic()
        deadline = float(self.manifest.get("deadline_seconds") or 0)
        lease = int(self.manifest.get("lease_seconds") or 0)
        gpus = GpuWatch()
        while True:
            ready = sel.select(0.5)
            gone = self.proc.poll() is not None  # before reading: what it wrote before it died is read now
            t = _now()
            records = gpus.records(t)
            for key, _ in ready:
                if key.data == "wake":
                    os.read(key.fd, 512)
                    continue
                records.extend(self.drain(key.fd, str(key.data), frames, decoders, t))
            if gone:
                if self.stop_reason is None:
                    self.proc.reap()  # what its cells started in the background goes with it
                for fd, name in ((frame_r, "frames"), (out_r, "stdout"), (err_r, "stderr")):
                    records.extend(self.drain(fd, name, frames, decoders, t))
                for name, decoder in decoders.items():
                    records.extend(_out_records(name, decoder.decode(b"", final=True), t))
                frames = FrameReader()  # a frame it was writing when it died is not the next kernel's
            self.log.append(_coalesce(records))
            if gone and self.stop_reason is not None:
                break
            if gone:
                self.proc = self.replace_kernel(env, out_w, err_w, frame_w)
            if self.stop_reason is None:
                if os.path.exists(self.path("stop")):
                    with open(self.path("stop")) as f:
                        self.request_stop(f.read().strip() or Reason.CANCELLED)
                else:
                    self.lapsed = self.lapse_reason(started, deadline, lease) or self.idle_reason()
                    if self.lapsed is not None:
                        self.request_stop(self.lapsed)
            self.escalate()
        rc = self.proc.wait()
        self.proc.reap()
        for fd in (out_w, err_w, frame_w, out_r, err_r, frame_r):
            os.close(fd)
        for name in (KERNEL_SOCKET, BUSY):
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                pass
        self.finish(rc, self.stop_reason or Reason.ERROR)
        return self.conclude(started)

    def drain(self, fd: int, name: str, frames: FrameReader, decoders: dict[str, Any], t: float
              ) -> list[dict[str, object]]:
        """Whatever a (non-blocking) pipe of the kernel holds now, as records."""
        records: list[dict[str, object]] = []
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return records
            if not data:
                return records
            if name == "frames":
                records.extend(self.frame_records(frames.feed(data), t))
            else:
                records.extend(_out_records(name, decoders[name].decode(data), t))

    def spawn_kernel(self, env: dict[str, str], out_w: int, err_w: int, frame_w: int) -> _Child:
        child = self.spawn(env, out_w, err_w, frame_w, kernel_main)
        with open(self.path(KERNEL_PID), "w") as f:
            f.write(str(child.pid))
        return child

    def replace_kernel(self, env: dict[str, str], out_w: int, err_w: int, frame_w: int) -> _Child:
        """The kernel died while the machine runs: say how, and start a fresh one (at most one a second)."""
        old = self.proc
        assert isinstance(old, _Child) and old.returncode is not None
        rc = old.returncode
        info = {"pid": old.pid, "rc": rc if rc >= 0 else None, "signal": -rc if rc < 0 else None, "t": _now()}
        _write_json_atomic(self.path(KERNEL_EXIT), info)
        try:
            os.unlink(self.path(BUSY))  # its cell, if any, is over
        except FileNotFoundError:
            pass
        _touch(self.path(ACTIVITY))
        self.log.append([{"k": Kind.NOTE, "m": "the remote Python process ended (%s); a fresh one starts"
                          % _how_it_ended(info), "t": _now()}])
        time.sleep(max(0.0, old.spawned + 1.0 - time.monotonic()))
        fresh = self.spawn_kernel(env, out_w, err_w, frame_w)
        self.log.append([{"k": Kind.STARTED, "pid": fresh.pid, "t": _now()}])
        return fresh

    def idle_reason(self) -> str | None:
        """IDLE when no cell runs and none has started or ended for the machine's idle_seconds."""
        if not self.idle or os.path.exists(self.path(BUSY)):
            return None
        return Reason.IDLE if _now() - _mtime(self.path(ACTIVITY)) > self.idle else None

    def lapse_reason(self, started: float, deadline: float, lease: int) -> str | None:
        """LEASE when the client has been silent for the lease, DEADLINE past the job's own hard maximum, BUDGET
        when the job's money reaches the client's own budget stop (the client stops it then; an agent that gets
        there first means the client could not), else None."""
        if deadline and time.monotonic() - started > deadline:
            return Reason.DEADLINE
        if lease and _now() - _mtime(self.path("lease")) > lease:
            return Reason.LEASE
        if self.money.out(self.money.stop_reserve):
            return Reason.BUDGET
        return None

    def watch(self, started: float, deadline: float, lease: int) -> str | None:
        """After the exit record, until the client destroys the job (which kills this process): a client that goes
        silent for the lease now (a kernel killed right after its cell ended) still leaves nothing billing.
        Returns why the dead-man's switch fires, or None when the job is being destroyed.

        A client that still renews the lease is fetching the results, however long past the deadline that takes:
        only its silence counts now. Without a lease the deadline is the one backstop left."""
        if not lease and not deadline and self.money.seconds_left(0.0) is None:
            return None
        while True:
            time.sleep(_WATCH_TICK)
            if not os.path.exists(self.path("lease")):
                return None  # the client's destroy is removing the job
            if self.money.out(self.money.end_reserve):
                return Reason.BUDGET  # only the end of the instance is left of the money, whoever is fetching results
            reason = self.lapse_reason(started, 0.0 if lease else deadline, lease)
            if reason in (Reason.LEASE, Reason.DEADLINE):
                return reason

    def spawn(self, env: dict[str, str], out_w: int, err_w: int, frame_w: int, main: Callable[[str], int]
              ) -> _Child:
        """Fork the cell or the kernel (``main``: no new interpreter to start, this one already has the agent
        loaded), or fork and exec the command. Its own session, so a stop signal reaches it and its children and
        nothing else. Its stdout, stderr and frames go to the given write ends (the caller reads the pipes)."""
        pid = os.fork()
        if pid:
            return _Child(pid)
        rc = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            # We ignore SIGINT; give the cell Python's default back, so a stop reaches it as KeyboardInterrupt.
            # The kernel sets its own (a SIGINT between cells must not end it): until then it keeps ignoring it.
            signal.signal(signal.SIGINT, signal.default_int_handler if main is cell_main else signal.SIG_IGN)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.closerange(3, frame_w)
            os.closerange(frame_w + 1, 1 << 16)
            os.chdir(self.path("work"))
            os.environ.clear()
            os.environ.update(env)
            command = self.manifest.get("command")
            if command and main is cell_main:
                try:
                    os.execvpe(command[0], list(command), env)
                except OSError as exc:
                    os.write(2, ("burst: cannot run %r: %s\n" % (command[0], exc.strerror)).encode())
                    rc = 127
            else:
                sys.argv = [_cell_filename(self.manifest)]
                rc = main(self.jobdir)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(rc)

    def frame_records(self, frames: list[tuple[bytes, bytes]], t: float) -> list[dict[str, object]]:
        records: list[dict[str, object]] = []
        for kind, payload in frames:
            if kind in (b"o", b"e"):
                records.extend(_out_records("stdout" if kind == b"o" else "stderr",
                                            payload.decode("utf-8", "replace"), t))
            elif kind == b"p":
                info = json.loads(payload)
                records.append({"k": Kind.PROGRESS, "p": info.get("p"), "m": info.get("m"), "t": t})
            elif kind == b"r":
                records.append({"k": Kind.RESULT, "data": json.loads(payload), "t": t})
            elif kind == b"d":
                records.append({"k": Kind.DISPLAY, "data": json.loads(payload), "t": t})
            elif kind == b"x":
                err = json.loads(payload)
                err.update(k=Kind.ERROR, t=t)
                records.append(err)
        return records

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_at = time.monotonic()
            if self.machine is not None:
                with open(self.path("stop"), "w") as f:
                    f.write(reason)  # its cells read why they were stopped with it
            self.log.append([{"k": Kind.NOTE, "m": STOPPING + reason, "t": _now()}])
            if self.proc is not None and self.proc.poll() is None:
                self.proc.signal(signal.SIGINT)

    def escalate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.money.out(self.money.end_reserve):
            # Only the end of the instance is left of the money: no more grace for the cell, whoever stopped it.
            self.lapsed = Reason.BUDGET
            self.request_stop(Reason.BUDGET)
            self.proc.signal(signal.SIGKILL)
            return
        if self.stop_at is None:
            return
        waited = time.monotonic() - self.stop_at
        if waited > _GRACE_SIGINT + _GRACE_SIGTERM:
            self.proc.signal(signal.SIGKILL)
        elif waited > _GRACE_SIGINT or (self.machine is not None and not os.path.exists(self.path(BUSY))):
            # A machine's kernel outlives a SIGINT: once no cell of it runs, it is ended at once.
            self.proc.signal(signal.SIGTERM)
        elif isinstance(self.proc, _KernelCell) and not self.proc.interrupted:
            self.proc.signal(signal.SIGINT)  # the stop came before the kernel had taken the cell: now it has

    def finish(self, rc: int, reason: str) -> None:
        _write_exit(self.jobdir, {"k": Kind.EXIT, "rc": rc, "reason": reason, "t": _now()})

    # -- the dead-man's switch ------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """One step of the dead-man's switch: a note in the event log (a client that re-attaches sees it) and a
        line in agent.log (what is left to read if the instance survives)."""
        self.log.append([{"k": Kind.NOTE, "m": "dead-man's switch: " + message, "t": _now()}])
        sys.stderr.write("%s burst-agent: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), message))
        sys.stderr.flush()

    def lapse(self, reason: str, lease: int, *, upload: bool = True) -> None:
        """The client is gone (``reason`` LEASE), failed to stop the job in time (DEADLINE) or the job's money is
        spent but for the end of the instance (BUDGET), and the cell has stopped: save the results where the
        manifest says, then end the instance by the provider's recipe; with none (or if it fails), remove the
        scratch ``work/`` and keep the results here for a later cleanup."""
        if reason == Reason.LEASE:
            self.say("no word from the client for %d s (the lease lapsed)" % lease)
        elif reason == Reason.IDLE:
            self.say("the machine ran no cell for %d s (its idle limit)" % self.idle)
        elif reason == Reason.BUDGET:
            self.say("the job's money ran out (%s); nobody ended the instance" % self.money.describe())
        else:
            self.say("the job ran past its hard maximum duration and the client did not stop it")
        if upload:
            self.upload_lapse_results()
        recipe = self.manifest.get("self_destruct")
        if isinstance(recipe, dict) and self.end_instance(recipe):
            return
        shutil.rmtree(self.path("work"), ignore_errors=True)
        self.say("job stopped and its work folder removed; its results wait in %s for the client or "
                 "`burst cleanup`" % self.jobdir)

    def upload_lapse_results(self) -> bool:
        """The results into the manifest's result sink, if it has one. True when one was tried."""
        upload = self.manifest.get("lapse_upload")
        if upload:
            self.upload_results(str(upload))
        return bool(upload)

    def upload_results(self, url: str) -> None:
        """PUT the results (what ``results`` sends: rw changes and pulled values) as one tar to a presigned URL,
        while the job's money lasts beyond the end of the instance."""
        path = self.path(LAPSE_ARCHIVE)
        try:
            with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _add_results(self.jobdir, tar)
        except OSError as exc:
            self.say("could not pack the results for the sink: %s" % exc)
            return
        size = os.path.getsize(path)
        self.say("uploading the results (%d bytes) to the result sink" % size)
        try:
            for attempt in range(len(_RETRY_DELAYS) + 1):
                left = self.money.seconds_left(self.money.end_reserve)
                if left is not None and left < 1.0:
                    self.say("no money left for the result sink upload: the instance is ended without it")
                    return
                with open(path, "rb") as archive:
                    status, text = _http("PUT", url, archive, {"Content-Length": str(size),
                                                               "Content-Type": "application/x-tar"},
                                         timeout=_HTTP_TIMEOUT if left is None else min(left, _HTTP_TIMEOUT))
                if 200 <= status < 300:
                    self.say("results stored in the result sink as %s" % LAPSE_ARCHIVE)
                    return
                self.say("result sink upload failed (try %d): %s" % (attempt + 1, _why(status, text)))
                if not _retryable(status) or attempt == len(_RETRY_DELAYS):
                    return
                time.sleep(_RETRY_DELAYS[attempt])
        finally:
            os.unlink(path)

    def end_instance(self, recipe: dict[str, object]) -> bool:
        """End this instance with the provider's scoped means. True once the provider accepted (when it is quick,
        the instance, and this process with it, is gone before the answer comes)."""
        provider = str(recipe.get("provider") or "the provider")
        ident, key = _instance_env(str(recipe["id_env"])), _instance_env(str(recipe["key_env"]))
        if not ident or not key:
            self.say("cannot end this %s instance: %s and %s are not set here; it is left for reconciliation"
                     % (provider, recipe["id_env"], recipe["key_env"]))
            return False
        url = str(recipe["url"]).replace("{id}", urllib.parse.quote(ident, safe=""))
        body = recipe.get("body")
        data = None if body is None else json.dumps(_fill_id(body, ident)).encode()
        headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json", "Accept": "application/json"}
        for attempt in range(len(_RETRY_DELAYS) + 1):
            self.say("ending %s instance %s with its own scoped key (try %d)" % (provider, ident, attempt + 1))
            status, text = _http(str(recipe["method"]), url, data, headers)
            if 200 <= status < 300 and not _graphql_errors(text):
                self.say("%s accepted the end of instance %s" % (provider, ident))
                return True
            if status == 404:
                self.say("%s no longer knows instance %s: it is gone" % (provider, ident))
                return True
            self.say("%s refused to end instance %s: %s" % (provider, ident, _why(status, text)))
            if not (_retryable(status) or 200 <= status < 300) or attempt == len(_RETRY_DELAYS):
                break
            time.sleep(_RETRY_DELAYS[attempt])
        self.say("could not end instance %s; reconciliation will (on the next load or `burst cleanup`)" % ident)
        return False


def _instance_env(name: str, proc_environ: str = "/proc/1/environ") -> str | None:
    """A variable the provider injected into the instance: this process's environment, else PID 1's (Vast puts its
    own there, and SSH sessions do not inherit it; 2026-11-29)."""
    value = os.environ.get(name)
    if value:
        return value
    try:
        with open(proc_environ, "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    for entry in entries:
        key, sep, found = entry.partition(b"=")
        if sep and key == name.encode() and found:
            return found.decode("utf-8", "replace")
    return None


def _fill_id(value: object, ident: str) -> object:
    """The recipe's body with every string that is exactly ``{id}`` replaced by the instance id."""
    if value == "{id}":
        return ident
    if isinstance(value, dict):
        return {k: _fill_id(v, ident) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_id(v, ident) for v in value]
    return value


def _http(method: str, url: str, data: object, headers: dict[str, str],
          timeout: float = _HTTP_TIMEOUT) -> tuple[int, str]:
    """One request from inside this process (a command line would show the key in ``ps``). (status, body text);
    status 0 when no answer came."""
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # type: ignore[arg-type]
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(4096).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:  # no connection, a timeout, a URL that is not one
        return 0, str(exc)


def _retryable(status: int) -> bool:
    return status == 0 or status in (408, 429) or status >= 500


def _graphql_errors(text: str) -> bool:
    """A GraphQL business error comes back inside an HTTP 200 (RunPod)."""
    try:
        body = json.loads(text)
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("errors"))


def _why(status: int, text: str) -> str:
    detail = " ".join(text.split())[:200]
    return ("HTTP %d: %s" % (status, detail)) if status else (detail or "no answer")


def _coalesce(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Merge neighbouring output records of the same stream (print writes text and newline separately), and
    neighbouring progress records into the last one."""
    merged: list[dict[str, object]] = []
    for r in records:
        prev = merged[-1] if merged else None
        if (prev is not None and r["k"] == Kind.OUT and prev["k"] == Kind.OUT and prev["s"] == r["s"]
                and len(str(prev["d"])) + len(str(r["d"])) <= _MAX_RECORD):
            prev["d"] = str(prev["d"]) + str(r["d"])
        elif prev is not None and r["k"] == Kind.PROGRESS and prev["k"] == Kind.PROGRESS:
            merged[-1] = dict(r)  # a progress flood: only the latest of a batch matters
        else:
            merged.append(dict(r))
    return merged


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _exit_code(status: int) -> int:
    """A wait status as subprocess says it: the exit status, or minus the signal that killed the process. (Not
    os.waitstatus_to_exitcode: it is Python 3.9, and an instance may have 3.8.)"""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class _Child:
    """The cell's (or kernel's) process as the supervisor sees it: pid, the read ends of its pipes, its status."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stdout_fd = self.stderr_fd = self.frames_fd = -1
        self.returncode: int | None = None
        self.spawned = time.monotonic()

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = _exit_code(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = _exit_code(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def signal(self, sig: int) -> None:
        _kill_group(self.pid, sig)

    def reap(self) -> None:
        _kill_group(self.pid, signal.SIGKILL)


_KERNEL_WAIT = 30  # seconds a cell waits for its machine's kernel to listen (one being replaced)


class _KernelCell:
    """A cell that the machine's kernel runs, as its supervisor sees it (in place of a :class:`_Child`): the read
    ends of its pipes, the socket to the kernel, the kernel's pid once it has taken the cell, the exit status
    it answered (or that it died: ``died``)."""

    def __init__(self, jobdir: str, machine: str, sock: Any) -> None:
        self.jobdir, self.machine, self.sock = jobdir, machine, sock
        self.pid: int | None = None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        frame_r, frame_w = os.pipe()
        self.stdout_fd, self.stderr_fd, self.frames_fd = out_r, err_r, frame_r
        self.ends = [out_w, err_w, frame_w]  # sent to the kernel, then closed here
        self.buf = b""
        self.returncode: int | None = None
        self.died = False
        self.closed = False
        self.interrupted = False

    @classmethod
    def connect(cls, jobdir: str, machine: str) -> _KernelCell | None:
        """Connect to the machine's kernel, waiting for one being started; None when there is none."""
        import socket

        until = time.monotonic() + _KERNEL_WAIT
        while True:
            if os.path.exists(os.path.join(machine, "exit.json")) or not os.path.isdir(machine):
                return None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            here = os.getcwd()
            try:
                os.chdir(machine)  # by a relative name: AF_UNIX paths are short
                try:
                    sock.connect(KERNEL_SOCKET)
                finally:
                    os.chdir(here)
                sock.setblocking(False)
                return cls(jobdir, machine, sock)
            except OSError:
                sock.close()
                if time.monotonic() > until:
                    return None
                time.sleep(0.1)

    def receive(self, t: float) -> list[dict[str, object]]:
        """The kernel's lines: {"pid"} when it is free (the cell is sent then: STARTED), {"rc"} at its end."""
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        records: list[dict[str, object]] = []
        if not data:
            self.close()
            if self.returncode is None:
                self.returncode, self.died = 1, True
            return records
        self.buf += data
        while b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if "pid" in message and self.pid is None and self.returncode is None:
                self.pid = int(message["pid"])
                self.send()
                # No pid a destroy would kill: the process is the machine's, not this job's.
                records.append({"k": Kind.STARTED, "kernel": self.pid, "on_machine": self.machine, "t": t})
            elif "rc" in message and self.returncode is None:
                self.returncode = int(message["rc"])
        return records

    def send(self) -> None:
        import array
        import socket

        request = (json.dumps({"jobdir": self.jobdir}) + "\n").encode()
        fds = array.array("i", self.ends).tobytes()
        self.sock.setblocking(True)
        try:
            self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError:
            pass  # the kernel died: its EOF comes next
        finally:
            self.sock.setblocking(False)
            self.drop_ends()

    def drop_ends(self) -> None:
        for fd in self.ends:
            os.close(fd)
        self.ends = []

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.drop_ends()
            self.sock.close()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        """The answer, once the cell's pipes are closed (the kernel is done with them, or dead)."""
        if self.returncode is None and not self.closed:
            self.sock.setblocking(True)
            while self.returncode is None and not self.closed:
                self.receive(_now())
        return 1 if self.returncode is None else self.returncode

    def signal(self, sig: int) -> None:
        """A stop: SIGINT to the kernel (KeyboardInterrupt in the cell), and only while it runs this cell;
        SIGTERM and SIGKILL to its whole session. A cell the kernel has not taken yet is never sent."""
        if self.returncode is not None or self.closed:
            return
        if self.pid is None:
            self.returncode = 130
            self.sock.shutdown(2)  # the kernel, once free, finds no cell; the loop here sees EOF
            self.drop_ends()
            return
        try:
            with open(os.path.join(self.machine, BUSY)) as f:
                if f.read() != self.jobdir:
                    return
        except OSError:
            return
        if sig == signal.SIGINT:
            try:
                os.kill(self.pid, sig)
                self.interrupted = True
            except OSError:
                pass
        else:
            _kill_group(self.pid, sig)

    def reap(self) -> None:
        self.close()  # the kernel and what it started are the machine's

    def death(self) -> str:
        """What the cell's ERROR says of the kernel that died under it (kernel.exit, which the machine writes)."""
        reason = _machine_stopping(self.machine)
        if reason is not None:
            return "the machine was stopped (%s) while this cell ran: what earlier cells defined is gone" % reason
        info = None
        until = time.monotonic() + 2.0
        while self.pid is not None and time.monotonic() < until:
            info = _read_json(os.path.join(self.machine, KERNEL_EXIT))
            if isinstance(info, dict) and info.get("pid") == self.pid:
                break
            info = None
            time.sleep(0.05)
        how = _how_it_ended(info, why=True) if isinstance(info, dict) else "ended"
        return ("the remote Python process died (%s): what earlier cells defined is lost; the next cell starts a "
                "fresh one" % how)


def _machine_stopping(machine: str) -> str | None:
    """Why the machine is stopping or has stopped (a Reason), or None while it runs."""
    try:
        with open(os.path.join(machine, "stop")) as f:
            reason = f.read().strip()
    except OSError:
        end = _read_json(os.path.join(machine, "exit.json"))
        return str(end.get("reason")) if isinstance(end, dict) else None
    return reason if reason in Reason.STOPS else Reason.CANCELLED


def _how_it_ended(info: dict[str, Any], *, why: bool = False) -> str:
    """How a kernel ended, from its kernel.exit; ``why``: with the likely cause of a SIGKILL (for the user)."""
    if info.get("signal") == signal.SIGKILL and why:
        return "killed by signal 9, e.g. out of memory"
    if info.get("signal"):
        return "killed by signal %s" % info["signal"]
    return "exited with status %s" % info.get("rc")


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------- staging


def _safe_members(tar: tarfile.TarFile, root: str) -> object:
    """Refuse absolute paths, ``..`` and links that point out of ``root`` (a bundle is data, not a script)."""
    real_root = os.path.realpath(root)
    for member in tar:
        name = member.name
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError("unsafe path in bundle: %r" % name)
        if member.issym() or member.islnk():
            target = os.path.realpath(os.path.join(root, os.path.dirname(name), member.linkname))
            if member.linkname.startswith("/") or not (target == real_root or target.startswith(real_root + os.sep)):
                raise ValueError("link in bundle points outside: %r -> %r" % (name, member.linkname))
        elif not (member.isfile() or member.isdir()):
            continue
        yield member


def _extract(tar: tarfile.TarFile, root: str) -> None:
    for member in _safe_members(tar, root):  # type: ignore[attr-defined]
        tar.extract(member, root, set_attrs=not member.isdir())


def _snapshot(root: str) -> dict[str, list[int]]:
    """Signature of every file under root, to send back only what the cell changed."""
    sig: dict[str, list[int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            sig[os.path.relpath(full, root)] = [st.st_size, st.st_mtime_ns, st.st_ino]
        for d in dirnames:
            sig[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = [0, 0, 0]
    return sig


class SetupError(Exception):
    pass


def _place_mounts(jobdir: str, mounts: list[dict[str, object]], machine: str | None = None) -> dict[str, str]:
    """Make each mount's remote path a symlink to its staged content. Never overwrite what is already there.

    For a cell on a machine, relative remote paths are under the machine's ``work/`` (where its kernel runs), and
    a mount with ``"keep": KEY`` is moved into the machine's store ``k/<KEY>/``, which its later cells reuse (the
    link stays too). Returns the folder each mount's content is in now (its results are read there)."""
    links = []
    roots: dict[str, str] = {}
    work = os.path.join(machine or jobdir, "work")
    for i, m in enumerate(mounts):
        staged = os.path.join(jobdir, "m", str(i))
        os.makedirs(staged, exist_ok=True)
        key = m.get("keep")
        if key is not None and machine is not None:
            staged = _keep(staged, machine, key, m.get("present"))
        roots[str(i)] = staged
        if m.get("file"):
            staged = os.path.join(staged, str(m["file"]))
        remote = str(m["remote"])
        target = os.path.expanduser(remote) if remote.startswith("~") else remote
        if not os.path.isabs(target):
            target = os.path.join(work, target)
        if key is not None and machine is not None and os.path.islink(target) and os.readlink(target) == staged:
            continue  # an earlier cell's link to the same store
        if os.path.islink(target) and _is_stale_link(target):
            os.unlink(target)
        if os.path.lexists(target):
            raise SetupError("remote path %s already exists on this machine; burst will not overwrite it "
                             "(choose another remote path)" % remote)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(staged, target)
        except OSError as exc:
            raise SetupError("cannot create %s here: %s; use a relative remote path (inside the job's folder) "
                             "or one you can write" % (remote, exc.strerror or exc)) from None
        if key is not None and machine is not None:
            # The machine's link: its destroy removes it, never a cell's.
            kept = _read_json(os.path.join(machine, "links.json"), [])
            _write_json_atomic(os.path.join(machine, "links.json"), [*(kept if isinstance(kept, list) else []), target])
            continue
        links.append(target)
        _write_json_atomic(os.path.join(jobdir, "links.json"), links)
    return roots


_KEY = re.compile(r"[0-9a-f]{8,64}")


def _inside(path: str, root: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top + os.sep)


def _keep(staged: str, machine: str, key: object, present: object) -> str:
    """Move what the cell uploaded for a kept mount (only what changed) into the machine's store ``k/<KEY>``,
    then remove what the store holds beyond ``present`` (the mount's files now, when given). The store's path."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise SetupError("a kept mount's key must be 8 to 64 hex digits, not %r" % (key,))
    if present is not None and (not isinstance(present, list) or not all(
            isinstance(p, str) and p and not p.startswith("/") and ".." not in p.split("/") for p in present)):
        raise SetupError("a kept mount's present files must be relative paths inside it")
    store = os.path.join(machine, STORES, key)
    os.makedirs(store, mode=0o700, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(staged):
        rel_dir = os.path.relpath(dirpath, staged)
        for name in sorted(dirnames) + sorted(filenames):
            src = os.path.join(dirpath, name)
            dest = os.path.normpath(os.path.join(store, rel_dir, name))
            if not _inside(os.path.dirname(dest), store):
                raise SetupError("%s leads out of the machine's kept copy of this mount"
                                 % os.path.relpath(dest, store))
            if os.path.islink(src):
                raise SetupError("a kept mount cannot carry a link: %s" % os.path.relpath(src, staged))
            if os.path.isdir(src):
                if os.path.islink(dest) or (os.path.lexists(dest) and not os.path.isdir(dest)):
                    os.unlink(dest)
                os.makedirs(dest, exist_ok=True)
            else:
                if os.path.isdir(dest) and not os.path.islink(dest):
                    shutil.rmtree(dest)
                os.replace(src, dest)
    shutil.rmtree(staged, ignore_errors=True)
    if present is not None:
        keep = {os.path.normpath(p) for p in present}
        parents = {os.path.dirname(p) for p in keep}
        while "" not in parents and parents:
            parents |= {os.path.dirname(p) for p in parents}
        for dirpath, dirnames, filenames in os.walk(store, topdown=False):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                rel = os.path.relpath(os.path.join(dirpath, name), store)
                if rel not in keep:
                    os.unlink(os.path.join(dirpath, name))
            rel_dir = os.path.relpath(dirpath, store)
            if rel_dir != "." and rel_dir not in keep and rel_dir not in parents and not os.listdir(dirpath):
                os.rmdir(dirpath)
    return store


_JOB_ID = re.compile(r"-[0-9a-f]{8}$")


def _is_stale_link(path: str) -> bool:
    """A link made by an earlier burst job (``<jobdir>/m/<i>[/file]``) whose job has ended or is gone."""
    parts = os.readlink(path).rstrip("/").split("/")
    for idx in range(len(parts) - 2, 0, -1):
        mount = parts[idx] == "m" and parts[idx + 1].isdigit()
        kept = parts[idx] == STORES and _KEY.fullmatch(parts[idx + 1]) is not None  # a machine's store
        if (mount or kept) and _JOB_ID.search(parts[idx - 1]):
            jobdir = "/".join(parts[:idx])
            return not os.path.isdir(jobdir) or os.path.exists(os.path.join(jobdir, "exit.json"))
    return False


_CHUNK = 1 << 20


class ChunkWriter:
    """Frames a byte stream as length-prefixed chunks ending with an empty one (read by :class:`ChunkedReader`).

    Both directions use it (the upload and the results): tar reads ahead in 10 KiB records, and framing keeps it
    from ever swallowing what follows on the same pipe (control lines up, the destroy reply down)."""

    def __init__(self, write: object) -> None:
        self._write = write
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        while len(self._buf) >= _CHUNK:
            self._write(struct.pack(">I", _CHUNK) + bytes(self._buf[:_CHUNK]))  # type: ignore[operator]
            del self._buf[:_CHUNK]
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._write(struct.pack(">I", len(self._buf)) + bytes(self._buf))  # type: ignore[operator]
            self._buf = bytearray()

    def close(self) -> None:
        self.flush()
        self._write(struct.pack(">I", 0))  # type: ignore[operator]


class ChunkedReader:
    """Reads what :class:`ChunkWriter` framed, up to its end marker, as a plain file object.

    The other side may be hostile: a chunk is at most _CHUNK bytes (else EOFError), and what is buffered is
    one chunk, consumed by offset (no copy of the rest on each read)."""

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self.buf = b""
        self.pos = 0
        self.done = False

    def _next_chunk(self) -> bool:
        head = self.stream.read(4)  # type: ignore[attr-defined]
        if len(head) < 4:
            raise EOFError("transfer cut short")
        (size,) = struct.unpack(">I", head)
        if size == 0:
            self.done = True
            return False
        if size > _CHUNK:
            raise EOFError("a transfer chunk of %d bytes (at most %d)" % (size, _CHUNK))
        chunk = self.stream.read(size)  # type: ignore[attr-defined]
        if len(chunk) < size:
            raise EOFError("transfer cut short")
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return True

    def read(self, n: int) -> bytes:
        while not self.done and len(self.buf) - self.pos < n:
            self._next_chunk()
        data = self.buf[self.pos : self.pos + n]
        self.pos += len(data)
        return data

    def drain(self) -> None:
        """Skip whatever is left, up to the end marker, holding one chunk at a time."""
        while not self.done:
            self.buf, self.pos = b"", 0
            self._next_chunk()
        self.buf, self.pos = b"", 0


def _write_exit(jobdir: str, record: dict[str, object], before: list[dict[str, object]] = ()) -> None:  # type: ignore[assignment]
    """The exit line goes into the log *before* exit.json exists: a reader that sees exit.json and reaches the
    end of the log has therefore read the exit line."""
    EventLog(os.path.join(jobdir, "events.jsonl")).append([*before, record])
    _write_json_atomic(os.path.join(jobdir, "exit.json"), record)


def _fail_setup(jobdir: str, message: str) -> None:
    _write_exit(jobdir, {"k": Kind.EXIT, "rc": 2, "reason": Reason.ERROR, "t": _now()},
                [{"k": Kind.SETUP_ERROR, "m": message, "t": _now()}])


def run_main(jobdir: str, stdin: object) -> int:
    (n,) = struct.unpack(">I", stdin.read(4))  # type: ignore[attr-defined]
    manifest = json.loads(stdin.read(n))  # type: ignore[attr-defined]
    manifest["received_at"] = _now()  # the job's money counts on from here on this machine's clock (see Money)
    os.makedirs(os.path.join(jobdir, "work"), exist_ok=True)
    os.chmod(jobdir, 0o700)
    upload = ChunkedReader(stdin)
    with tarfile.open(fileobj=upload, mode="r|*") as tar:  # type: ignore[call-overload]  # gzip or plain
        _extract(tar, jobdir)
    upload.drain()  # the rest of the upload, up to its end marker
    if isinstance(manifest.get("on_machine"), str):
        # Named as the client names job directories (relative to the login's home on a marketplace), as main() does.
        manifest["on_machine"] = os.path.abspath(os.path.expanduser(manifest["on_machine"]))
    _write_json_atomic(os.path.join(jobdir, "job.json"), manifest)
    mounts = manifest.get("mounts") or []
    with open(os.path.join(jobdir, "lease"), "w"):
        pass
    try:
        machine = _machine_of(manifest)
        roots = _place_mounts(jobdir, mounts, machine)
    except SetupError as exc:
        _fail_setup(jobdir, str(exc))
        return attach_main(jobdir, 0, stdin)
    # What the rw mounts hold now, so the results are what the job changed; a kept mount's is in the machine.
    snapshots = {str(i): _snapshot(roots[str(i)]) for i, m in enumerate(mounts) if m.get("mode") == "rw"}
    _write_json_atomic(os.path.join(jobdir, "roots.json"),
                       {i: root for i, root in roots.items() if root != os.path.join(jobdir, "m", i)})
    _write_json_atomic(os.path.join(jobdir, "snapshot.json"), snapshots)
    if manifest.get("require_gpu") is not None:
        problem = _check_gpu(manifest["require_gpu"], int(manifest.get("gpus") or 1))
        if problem:
            _fail_setup(jobdir, problem)
            return attach_main(jobdir, 0, stdin)
    _daemonize(jobdir, lambda: Supervisor(jobdir).run())
    return attach_main(jobdir, 0, stdin)


def _machine_of(manifest: dict[str, object]) -> str | None:
    """The machine job a cell runs on (``on_machine``), checked: None for a job of its own."""
    machine = manifest.get("on_machine")
    if machine is None:
        return None
    if not isinstance(machine, str) or not os.path.isabs(machine) or ".." in machine.split("/"):
        raise SetupError("on_machine must be the absolute job directory of a machine, not %r" % (machine,))
    found = _read_json(os.path.join(machine, "job.json"))
    if not isinstance(found, dict) or not isinstance(found.get("machine"), dict):
        raise SetupError("there is no machine at %s" % machine)
    return os.path.normpath(machine)


def _daemonize(jobdir: str, target: object) -> None:
    """Run ``target()`` in a detached grandchild (new session, stdio to agent.log) and return at once.

    A fork, not a new interpreter: the agent is already loaded here. The double fork leaves the supervisor
    reparented to init, so neither this SSH session ending nor the client's signals can reach it."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)  # the middle process exits at once
        return
    rc = 1
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        log = os.open(os.path.join(jobdir, "agent.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 1 << 16)  # the SSH channel's pipes must close when the front exits, not with us
        os.chdir(jobdir)
        rc = target()  # type: ignore[operator]
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(rc)


def _check_gpu(names: list[str], count: int) -> str | None:
    """None if nvidia-smi shows ``count`` GPUs whose name is one of ``names`` (empty names: any GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return "this machine has no NVIDIA GPU (nvidia-smi not found)"
    found = [line.strip() for line in out.splitlines() if line.strip()]
    fit = [g for g in found if not names or g in names]
    if len(fit) < count:
        return "this machine has %s; the job asks for %d x %s" % (
            ", ".join(found) or "no GPU", count, " or ".join(names) or "any GPU")
    return None


# --------------------------------------------------------------------------------------- attach / results


def _control_loop(jobdir: str, stdin: object, out: object, finished: threading.Event) -> None:
    """Lines from the client: ``lease`` renews the lease, ``stop REASON`` ends the job early, and, once the
    results are delivered, ``destroy`` removes the job on this same channel (no second connection or Python)."""
    try:
        while True:
            line = stdin.readline()  # type: ignore[attr-defined]
            if not line:
                return
            word, _, arg = line.decode("utf-8", "replace").strip().partition(" ")
            if word == Control.LEASE:
                os.utime(os.path.join(jobdir, "lease"))
            elif word == Control.STOP:
                stop_main(jobdir, arg or Reason.CANCELLED)
            elif word == Control.DESTROY:
                gone = destroy(jobdir)
                out.write(record_line({"k": Kind.GONE if gone else Kind.STILL_THERE}))  # type: ignore[attr-defined]
                out.flush()  # type: ignore[attr-defined]
                return
    finally:
        finished.set()


def _supervisor_alive(jobdir: str) -> bool:
    try:
        with open(os.path.join(jobdir, "supervisor.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return True  # not written yet: it is starting
    if not _pid_alive(pid):
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            # The supervisor is a fork of the `run` front, whose command line names the job: not a reused pid.
            return os.path.basename(jobdir).encode() in f.read()
    except OSError:
        return True  # no /proc (macOS): trust the pid


def attach_main(jobdir: str, offset: int, stdin: object) -> int:
    if not os.path.isdir(jobdir):
        sys.stderr.write("burst-agent: no job at %s\n" % jobdir)
        return 3
    out = sys.stdout.buffer
    finished = threading.Event()
    threading.Thread(target=_control_loop, args=(jobdir, stdin, out, finished), daemon=True).start()
    path = os.path.join(jobdir, "events.jsonl")
    exit_path = os.path.join(jobdir, "exit.json")
    while not os.path.exists(path):
        time.sleep(0.002)
    f = open(path, "rb")
    f.seek(offset)
    pending = b""
    idle = 0.0
    polls = 0
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            # exit.json is written after the exit line: if it existed before this read, the read reaches the end.
            complete = os.path.exists(exit_path)
            chunk = f.read(1 << 20)
            if not chunk:
                if complete:
                    break
                # Poll the log: 2 ms while output is flowing, backing off to 50 ms when idle.
                idle = min(0.05, idle * 2 or 0.002)
                time.sleep(idle)
                polls += 1
                if polls % 40 == 0 and not _supervisor_alive(jobdir) and not os.path.exists(exit_path):
                    _write_exit(jobdir, {"k": Kind.EXIT, "rc": -1, "reason": Reason.AGENT_DIED, "t": _now()})
                continue
        idle = 0.0
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        if cut:
            out.write(pending[:cut])
            out.flush()
            pending = pending[cut:]
    results_main(jobdir)
    finished.wait()  # for the client's `destroy`, or until it hangs up
    return 0


def results_main(jobdir: str) -> int:
    """The results on stdout after a ``results`` line: a chunk-framed tar of the files the cell changed in rw
    mounts (``m/<i>/...``) and ``values.out.pkl``."""
    out = sys.stdout.buffer
    out.write(record_line({"k": Kind.RESULTS}))
    out.flush()
    framed = ChunkWriter(out.write)
    with tarfile.open(fileobj=framed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        _add_results(jobdir, tar)
    framed.close()
    out.flush()
    return 0


def _sendable(path: str, root: str) -> bool:
    """What the client accepts back: files, folders and links that stay inside their mount. A cell's link to an
    absolute path (``latest -> /ckpt/7``) or a FIFO is left here, not sent to be refused with the whole results."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    if stat.S_ISLNK(mode):
        real, top = os.path.realpath(path), os.path.realpath(root)
        return real == top or real.startswith(top + os.sep)
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def _add_results(jobdir: str, tar: tarfile.TarFile) -> None:
    """The files the cell changed in rw mounts (``m/<i>/...``) and ``values.out.pkl``."""
    snapshots = _read_json(os.path.join(jobdir, "snapshot.json"), {})
    roots = _read_json(os.path.join(jobdir, "roots.json"), {})
    assert isinstance(snapshots, dict) and isinstance(roots, dict)
    for i, before in sorted(snapshots.items()):
        root = str(roots.get(i) or os.path.join(jobdir, "m", i))  # a kept mount's store is the machine's
        for rel, sig in sorted(_snapshot(root).items()):
            path = os.path.join(root, rel.rstrip("/"))
            if before.get(rel) != sig and _sendable(path, root):
                tar.add(path, arcname="m/%s/%s" % (i, rel.rstrip("/")), recursive=False)
    values = os.path.join(jobdir, "values.out.pkl")
    if os.path.exists(values):
        tar.add(values, arcname="values.out.pkl")


# ------------------------------------------------------------------------------------ stop / destroy / list


def stop_main(jobdir: str, reason: str) -> int:
    if not os.path.isdir(jobdir) or os.path.exists(os.path.join(jobdir, "exit.json")):
        return 0
    with open(os.path.join(jobdir, "stop"), "w") as f:
        f.write(reason if reason in Reason.STOPS else Reason.CANCELLED)
    try:
        with open(os.path.join(jobdir, "supervisor.pid")) as f:
            os.kill(int(f.read().strip()), signal.SIGUSR1)  # wake its select; it reads the stop file
    except (OSError, ValueError):
        pass
    return 0


def destroy_main(jobdir: str) -> int:
    gone = destroy(jobdir)
    sys.stdout.write(Kind.GONE + "\n" if gone else "still there\n")
    return 0 if gone else 1


def destroy(jobdir: str) -> bool:
    """Kill the job's processes, remove the links it made and its directory. True once nothing is left."""
    if os.path.isdir(jobdir):
        pids = []
        for name in ("supervisor.pid",):
            try:
                with open(os.path.join(jobdir, name)) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        manifest = _read_json(os.path.join(jobdir, "job.json"), {})
        machine = manifest.get("on_machine") if isinstance(manifest, dict) else None
        if isinstance(machine, str):
            _interrupt_kernel(machine, jobdir)  # only this job's cell: the kernel is the machine's
        else:
            # A machine's kernel now (an earlier one, replaced, may have left its pid to another process).
            started = _read_pid(os.path.join(jobdir, KERNEL_PID)) or _started_pid(jobdir)
            if started:
                _kill_group(started, signal.SIGKILL)
        for pid in pids:
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        links = _read_json(os.path.join(jobdir, "links.json"), [])
        ours = (os.path.join(jobdir, "m") + os.sep, os.path.join(jobdir, STORES) + os.sep)
        for link in links if isinstance(links, list) else []:
            if os.path.islink(link) and (os.readlink(link) + os.sep).startswith(ours):
                os.unlink(link)
        shutil.rmtree(jobdir, ignore_errors=True)
    return not os.path.exists(jobdir)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _interrupt_kernel(machine: str, jobdir: str) -> None:
    """A KeyboardInterrupt in the machine's kernel if it runs this job's cell (a destroyed cell must not go on)."""
    try:
        with open(os.path.join(machine, BUSY)) as f:
            if f.read() != jobdir:
                return
    except OSError:
        return
    pid = _read_pid(os.path.join(machine, KERNEL_PID))
    if pid:
        try:
            os.kill(pid, signal.SIGINT)
        except OSError:
            pass


def _started_pid(jobdir: str) -> int | None:
    try:
        with open(os.path.join(jobdir, "events.jsonl"), "rb") as f:
            for line in f:
                if b'"k":"%s"' % Kind.STARTED.encode() in line:
                    return int(json.loads(line)["pid"])
    except (OSError, ValueError, KeyError):
        pass
    return None


def _log_end(path: str) -> int:
    """The byte offset just past the log's last whole line: where a client that needs no past output attaches."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            tail_start = max(0, size - _MAX_RECORD * 2)
            f.seek(tail_start)
            tail = f.read()
    except OSError:
        return 0
    cut = tail.rfind(b"\n")
    return tail_start + cut + 1 if cut >= 0 else 0


def status_main(jobdir: str) -> int:
    info: dict[str, object] = {"exists": os.path.isdir(jobdir)}
    if info["exists"]:
        info["exit"] = _read_json(os.path.join(jobdir, "exit.json"))
        info["running"] = info["exit"] is None and _supervisor_alive(jobdir)
        info["log_end"] = _log_end(os.path.join(jobdir, "events.jsonl"))
    sys.stdout.write(json.dumps(info) + "\n")
    return 0


def list_main(root: str, tag: str) -> int:
    try:
        names = sorted(os.listdir(root))
    except OSError:
        names = []
    for name in names:
        manifest = _read_json(os.path.join(root, name, "job.json"))
        if isinstance(manifest, dict) and manifest.get("tag") == tag:
            jobdir = os.path.join(root, name)
            info = {"job_id": name, "created": manifest.get("created"),
                    "exit": _read_json(os.path.join(jobdir, "exit.json"))}
            if manifest.get("on_machine"):
                info["on_machine"] = manifest["on_machine"]  # a cell: the machine job owns the instance
            sys.stdout.write(json.dumps(info) + "\n")
    return 0


def main(argv: list[str]) -> int:
    cmd, jobdir = argv[0], os.path.abspath(os.path.expanduser(argv[1]))
    arg = argv[2] if len(argv) > 2 else ""
    stdin = sys.stdin.buffer
    if cmd == "run":
        return run_main(jobdir, stdin)
    if cmd == "attach":
        return attach_main(jobdir, int(arg or 0), stdin)
    if cmd == "results":
        return results_main(jobdir)
    if cmd == "stop":
        return stop_main(jobdir, arg)
    if cmd == "destroy":
        return destroy_main(jobdir)
    if cmd == "status":
        return status_main(jobdir)
    if cmd == "list":
        return list_main(jobdir, arg)
    sys.stderr.write("burst-agent: unknown command %r\n" % cmd)
    return 2


if __name__ == "__main__":
    # Through BOOT argv is ['-c', N, CMD, JOBDIR, ...]; as a file it is [agent.py, CMD, JOBDIR, ...].
    sys.exit(main(sys.argv[2:] if sys.argv[0] == "-c" else sys.argv[1:]))
