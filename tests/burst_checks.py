"""Helpers for the tests that run %%burst and the Python API against the real local provider.

They read real state only: the ledger and reservations through ``Budget``, the state store through
``StateStore`` (and its SQLite file), the local provider's job folders under ``BURST_HOME/local``, and what the
cell wrote to stdout and stderr, in the order it arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from burst_jupyter.budget import Budget, LedgerRow
from burst_jupyter.providers._http import RetryPolicy
from burst_jupyter.providers.base import Offer, OfferQuery, Provider
from burst_jupyter.state import OwnedInstance, StateStore

T = TypeVar("T")
P = TypeVar("P", bound=Provider)

#: A provider client's backoff in hundredths of a second: its tests must not wait out real retries.
FAST_RETRY = RetryPolicy(base_seconds=0.01, max_sleep_seconds=0.02)


def db_file(home: Path) -> Path:
    return home / "burst.sqlite3"


def ledger_rows(home: Path) -> list[LedgerRow]:
    with Budget(db_file(home)) as budget:
        return budget.rows()


def open_reservations(home: Path) -> list[Any]:
    with Budget(db_file(home)) as budget:
        return budget.open_reservations()


def live_instances(home: Path) -> list[OwnedInstance]:
    if not db_file(home).exists():  # a kernel may not have made it yet: do not create it from the test
        return []
    store = StateStore(db_file(home))
    try:
        return store.live()
    finally:
        store.close()


def state_row(home: Path, job_id: str) -> OwnedInstance | None:
    store = StateStore(db_file(home))
    try:
        return store.get(job_id)
    finally:
        store.close()


def state_row_count(home: Path) -> int:
    """Every row of the state store, whatever its state (0 when the file was never created)."""
    if not db_file(home).exists():
        return 0
    conn = sqlite3.connect(db_file(home))
    try:
        return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    except sqlite3.OperationalError:  # no table yet
        return 0
    finally:
        conn.close()


def local_jobdirs(home: Path) -> list[str]:
    """What the local provider has on this machine: one folder per job that is not yet terminated."""
    root = home / "local"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def seed_ledger(home: Path) -> LedgerRow:
    """One settled row, so "ledger unchanged" compares against something."""
    import datetime as dt
    from decimal import Decimal

    now = dt.datetime.now(dt.timezone.utc)
    with Budget(db_file(home)) as budget:
        return budget.settle("seed-00000000", provider="local", instance_id="seed-00000000", gpu="",
                             rate_usd_per_hour=Decimal("1.5"), started_at=now - dt.timedelta(minutes=2),
                             ended_at=now, actual_usd=Decimal("0.05"), status="completed", name="seed")


@dataclass
class Streams:
    """Stand-ins for sys.stdout and sys.stderr that record every write, in order, with its stream.

    ``on_write(stream, text)`` is called after each write (on the writing thread)."""

    writes: list[tuple[str, str]] = field(default_factory=list)
    on_write: Callable[[str, str], None] | None = None

    def stream(self, name: str) -> _Recorder:
        return _Recorder(self, name)

    def text(self, name: str | None = None, *, ours: bool = False) -> str:
        """What was written (to ``name`` only, or both), without burst's own ``[burst]`` status lines unless
        ``ours``."""
        joined = "".join(t for s, t in self.writes if name is None or s == name)
        if ours:
            return joined
        return "".join(line for line in joined.splitlines(keepends=True) if not line.startswith("[burst] "))

    def lines(self) -> list[tuple[str, str]]:
        """Complete lines as (stream, line), in the order each line was completed; status lines dropped."""
        partial = {"stdout": "", "stderr": ""}
        out: list[tuple[str, str]] = []
        for stream, text in self.writes:
            buf = partial[stream] + text
            *done, partial[stream] = buf.split("\n")
            out.extend((stream, line) for line in done if not line.startswith("[burst] "))
        out.extend((s, rest) for s, rest in partial.items() if rest)
        return out


class _Recorder:
    def __init__(self, streams: Streams, name: str) -> None:
        self._streams, self.name = streams, name
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        self._streams.writes.append((self.name, text))
        if self._streams.on_write is not None:
            self._streams.on_write(self.name, text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def recorded(on_write: Callable[[str, str], None] | None = None) -> Iterator[Streams]:
    streams = Streams(on_write=on_write)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = streams.stream("stdout"), streams.stream("stderr")  # type: ignore[assignment]
    try:
        yield streams
    finally:
        sys.stdout, sys.stderr = saved


def run_cell(ip: Any, source: str, on_write: Callable[[str, str], None] | None = None) -> tuple[Any, Streams]:
    """Run ``source`` in the real shell; return IPython's ExecutionResult and what was written."""
    with recorded(on_write) as streams:
        result = ip.run_cell(source, store_history=False)
    return result, streams


def last_job() -> Any:
    import burst_jupyter as burst

    jobs = burst.jobs()
    assert jobs, "no job was started"
    return jobs[-1]


def wait_until(condition: Callable[[], bool], what: str, *, limit: float = 60.0) -> None:
    """Poll for something a job does (not a timing assert: the limit only turns a hang into a failure)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


class MoneyClock:
    """The session's clocks (:class:`burst_jupyter.meter.Clock`) for a test about a cap: the wall clock, which money
    runs on, stands still until the test moves it on, and waits keep the real monotonic clock. The test moves the
    money to the point it is about instead of waiting real seconds for it."""

    def __init__(self) -> None:
        self._now = time.time()
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        return time.monotonic()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def advance_once(self, ready: Callable[[], bool], seconds: float) -> None:
        """From a thread of its own (the test's own waits on the job): once ``ready()``, move the money on."""
        def run() -> None:
            wait_until(ready, "the moment to move the money on")
            self.advance(seconds)

        threading.Thread(target=run, name="money-clock", daemon=True).start()


def job_event(type: Any, text: str = "") -> Callable[[], bool]:
    """Whether a job of this process has had an event of ``type`` (with ``text`` in its text)."""
    import burst_jupyter as burst

    return lambda: any(e.type is type and text in (e.text or "") for job in burst.jobs() for e in job.events)


def usage_line(result: Any) -> str:
    """The one-line UsageError a cell failed with."""
    from IPython.core.error import UsageError

    error = result.error_in_exec if result.error_in_exec is not None else result.error_before_exec
    assert isinstance(error, UsageError), f"expected a UsageError, got {error!r}"
    text = str(error)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


def cell(options: str, body: str = "print('must not run')") -> str:
    """A %%burst cell: the options line, then ``body`` dedented."""
    return f"%%burst {options}\n{textwrap.dedent(body).strip()}\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# A --python that runs the real agent the client ships, read from stdin as agent.BOOT reads it, once PATCH has
# replaced a part of it in the agent's namespace ``ns``: what anyone with root on a rented machine can do.
_TAMPERED_AGENT = """#!{python}
import os, sys
n, command = int(sys.argv[3]), sys.argv[4:]
ns = {{"__name__": "burst-agent"}}
exec(compile(sys.stdin.buffer.read(n), "burst-agent", "exec"), ns)
{patch}
sys.exit(ns["main"](command))
"""


def tampered_agent(path: Path, patch: str) -> Path:
    """Write that --python to ``path``: ``patch`` (dedented) runs with ``os``, ``sys`` and the agent's ``ns``."""
    path.write_text(_TAMPERED_AGENT.format(python=sys.executable, patch=textwrap.dedent(patch).strip()))
    path.chmod(0o755)
    return path


def ok(result: Any, streams: Any) -> None:
    """The cell succeeded (else show what it printed)."""
    assert result.error_in_exec is None, streams.text()


def gated_lines_cell(lines: int, gates: dict[int, str], *, pause: float) -> str:
    """A cell printing ``line i`` (every third on stderr) that waits at each line in ``gates`` until its gate file
    exists (the test opens it once the client has noticed a cut), then writes out/done.txt."""
    return f"""
import os, sys, time
gates = {gates!r}
for i in range({lines}):
    print(f"line {{i}}", file=sys.stderr if i % 3 == 2 else sys.stdout, flush=True)
    if i in gates:  # held here until the client has noticed the cut
        for _ in range(6000):
            if os.path.exists(gates[i]):
                break
            time.sleep(0.01)
        else:
            raise RuntimeError(f"gate {{i}} never opened")
    time.sleep({pause})
open("out/done.txt", "w").write("all {lines} lines")
"""


def protocol_gaps(obj: object, protocol: type) -> list[str]:
    """How ``obj`` falls short of ``protocol``: a member it lacks, or a method that is not async where the
    Protocol's is or takes other parameters. (``isinstance`` on a runtime-checkable Protocol only asks that each
    name exists, whatever its value: it passes a ``launch`` that lost a keyword.)"""
    names = {n for klass in protocol.__mro__[:-1] for n in (*vars(klass), *getattr(klass, "__annotations__", {}))
             if not n.startswith("_") and klass.__module__ != "typing"}
    gaps = []
    for name in sorted(names):
        if not hasattr(obj, name):
            gaps.append(f"no {name}")
            continue
        wanted = inspect.getattr_static(protocol, name, None)
        if not inspect.isfunction(wanted):
            continue  # an attribute: having it is all the Protocol asks
        got = getattr(obj, name)
        if inspect.iscoroutinefunction(wanted) and not inspect.iscoroutinefunction(got):
            gaps.append(f"{name} is not async")
        want, have = inspect.signature(wanted), inspect.signature(got)  # ``got`` is bound: no self
        want = want.replace(parameters=list(want.parameters.values())[1:])
        if [(p.name, p.kind, p.default is p.empty) for p in want.parameters.values()] != \
                [(p.name, p.kind, p.default is p.empty) for p in have.parameters.values()]:
            gaps.append(f"{name}{have} is not {name}{want}")
    return gaps


def run_provider(p: P, work: Callable[[P], Awaitable[T]]) -> T:
    """``work`` on a provider client in an event loop of its own; the client is closed after, whatever happens."""

    async def go() -> T:
        try:
            return await work(p)
        finally:
            await p.aclose()

    return asyncio.run(go())


async def first_offer(p: Provider, model: str = "H100", gpus: int = 1) -> Offer:
    """The provider's first offer of ``gpus`` x ``model`` (the test fails if there is none)."""
    offers = await p.offers(OfferQuery(gpu_model=model, gpus=gpus))
    assert offers, f"no {model} offer"
    return offers[0]
