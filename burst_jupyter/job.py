"""A job: what was decided before it runs (:class:`JobPlan`), its thread-safe handle (:class:`Job`), how it ended
(:class:`JobResult`), and the money rules every part shares (:func:`cost_of`, the cap). lifecycle.py runs it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, JobCancelled, JobInterrupted, NoCapacity, one_line
from .events import FINAL_EVENTS, EventType, JobEvent
from .money import format_rate, format_usd
from .offer_book import rank
from .options import PROVISION_TIMEOUT_SECONDS
from .output import OutputBounds
from .providers.base import Offer, OfferQuery, OfferRef, Provider
from .sync import MountPlan
from .variables import NO_RESULT

if TYPE_CHECKING:
    from .handoff import Handoff
    from .offer_book import OfferBook
    from .providers import ProviderConfig
    from .sinks import ResultSink
    from .spec import JobSpec

__all__ = ["MIN_BILLABLE_SECONDS", "Job", "JobPlan", "JobResult", "JobStatus", "check_cap", "cost_of", "decide_cap"]

_MICRO = Decimal("0.000001")
# What a job needs beyond its own run time to start and stop: the cap must buy at least this much.
MIN_BILLABLE_SECONDS = 10.0


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_KILLED = "budget_killed"

    def __str__(self) -> str:
        return self.value


#: The events after which the cell prints nothing more: the tail of its output is shown before them.
_OUTPUT_OVER = frozenset({EventType.SYNCING_DOWN, EventType.TERMINATED}) | FINAL_EVENTS


def cost_of(rate: Decimal, seconds: float) -> Decimal:
    """What ``seconds`` at ``rate`` $/h cost, rounded up to a millionth of a dollar (never under-reported)."""
    return (rate * Decimal(repr(max(seconds, 0.0))) / 3600).quantize(_MICRO, rounding=ROUND_CEILING)


def decide_cap(max_cost: Decimal | None, rate: Decimal, max_seconds: float, teardown_seconds: float) -> Decimal:
    """The job's finite cap, decided here only: ``--max-cost``, else the rate for the whole maximum duration; one
    clear line (:class:`ConfigError`) when it buys too little to start and stop a job at ``rate``. A declared rate
    (local, ssh) decides it when the job is planned; a marketplace's when its offer is chosen."""
    cap = max_cost if max_cost is not None else cost_of(rate, max_seconds)
    check_cap(cap, rate, teardown_seconds)
    return cap


def check_cap(cap: Decimal, rate: Decimal, teardown_seconds: float) -> None:
    """Refuse a cap too small to start and stop a job at ``rate``: one clear line, before anything is rented (and
    again when a machine bills another rate than quoted, or a relaunch has only what is left of the cap)."""
    if rate > 0 and cap < cost_of(rate, MIN_BILLABLE_SECONDS + teardown_seconds):
        raise ConfigError(f"--max-cost ${cap} buys only {float(cap / rate * 3600):.0f} s at {format_rate(rate)}/h, "
                          f"too little to start and stop a job")


@dataclass
class JobResult:
    """What a finished job left: its status and bill, pulled variables, the last expression's value."""

    job_id: str
    status: JobStatus
    total_cost_usd: Decimal | None
    values: dict[str, Any] = field(default_factory=dict)
    result: Any = NO_RESULT
    error: BaseException | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def raise_for_status(self) -> None:
        if self.error is not None:
            raise self.error
        if self.status is not JobStatus.COMPLETED:
            raise JobCancelled(f"job {self.job_id} ended {self.status.value}")


@dataclass(frozen=True)
class OnMachine:
    """The kept machine a cell runs on: its name, and the job directory its Python process runs in there."""

    name: str
    jobdir: str


@dataclass(frozen=True)
class JobPlan:
    """Everything decided before the job is queued (validated input; nothing rented yet)."""

    job_id: str
    spec: JobSpec
    providers: dict[str, Provider]  # the candidates: one, or every configured marketplace for `auto`
    configs: dict[str, ProviderConfig]  # how a reaper builds each again
    cap_usd: Decimal | None  # None: the chosen offer's rate for the whole max duration (marketplaces)
    max_seconds: float
    mounts: list[MountPlan]
    pushed: dict[str, bytes]
    cell: str | None
    tag: str
    handoff: Handoff  # what a reaper needs beyond the instance (local mount paths, names); its mounts kept current
    sink: ResultSink | None = None  # also receives the rw results; check()ed before anything was rented
    offers: OfferBook | None = None  # marketplaces: the session's cached, concurrent search
    keys_dir: Path | None = None  # where per-job SSH keys live (marketplaces)
    provision_timeout: float = PROVISION_TIMEOUT_SECONDS
    on: OnMachine | None = None  # a cell on a kept machine (%burst up)

    def query(self) -> OfferQuery:
        spec = self.spec
        return OfferQuery(gpu_model=spec.gpu_model, gpus=spec.gpus, memory_gb=spec.memory_gb,
                          max_price_usd_per_hour=spec.max_price_usd_per_hour, spot=spec.spot,
                          prototyping=spec.prototyping or spec.offer is not None,  # naming an offer allows it
                          min_reliability=spec.min_reliability)

    async def search(self, *, refresh: bool = False) -> tuple[list[Offer], dict[str, str]]:
        """The offers that fit, ranked, and what went wrong per provider. ``--offer`` narrows to that one.
        ``refresh`` asks every provider again instead of reusing the session's recent answers."""
        errors: dict[str, str] = {}
        if self.offers is not None:
            result = await self.offers.search(self.providers, self.query(), refresh=refresh)
            offers, errors = result.offers, result.errors
        else:
            (provider,) = self.providers.values()
            offers = rank(await provider.offers(self.query()))
        if self.spec.offer is not None:
            ref = OfferRef.parse(self.spec.offer)
            offers = [o for o in offers if ref.matches(o)]
        return offers, errors

    def no_offer(self, errors: dict[str, str]) -> NoCapacity:
        spec = self.spec
        if spec.offer is not None:
            return NoCapacity(f"offer {spec.offer} is no longer offered (or no longer fits); search again")
        limit = f" under ${spec.max_price_usd_per_hour}/h" if spec.max_price_usd_per_hour is not None else ""
        where = ", ".join(self.providers)
        why = "".join(f"; {name}: {text}" for name, text in errors.items())
        if errors.keys() >= self.providers.keys():  # none answered: nothing was found not to fit
            return NoCapacity(f"no offer could be searched{why}")
        return NoCapacity(f"no {where} offer fits {spec.gpus} x {spec.gpu_model or 'any GPU'}"
                          f"{' (spot)' if spec.spot else ''}{limit}{why}")

    def decide_cap(self, offer: Offer, teardown_seconds: float) -> Decimal:
        """The job's cap on ``offer`` (:func:`decide_cap`): ``cap_usd`` when the plan fixed it."""
        return decide_cap(self.cap_usd, offer.price_usd_per_hour, self.max_seconds, teardown_seconds)

    def worst_case(self, cap: Decimal, offers: list[Offer]) -> Decimal:
        """What the budget holds for the job before it runs: its cap, but $0 on the user's own machines at a
        declared $0/h (local, ssh), where nothing can bill more. A marketplace's rate is read back after the
        create and may differ, so a rented job always holds its cap."""
        if self.offers is None and all(offer.price_usd_per_hour == 0 for offer in offers):
            return Decimal(0)
        return cap


class Job:
    """The handle of one job. Thread-safe: events are produced on the session loop, read from anywhere.

    Example:
        >>> job = burst.submit(JobSpec(cell="print(1)"))   # doctest: +SKIP
        >>> job.wait().status                                # doctest: +SKIP
        <JobStatus.COMPLETED: 'completed'>
    """

    def __init__(self, plan: JobPlan, loop: asyncio.AbstractEventLoop, *, output_log: Path | None = None) -> None:
        self.id = plan.job_id
        self.spec = plan.spec
        self.plan = plan
        self._loop = loop
        # The remote output: bounded for the notebook and this list, whole (up to a cap) in ``output_log``.
        self._output = OutputBounds(output_log)
        self._events: list[JobEvent] = []
        self._progress_at: int | None = None  # where the one progress event kept in ``_events`` is
        self._listeners: list[Callable[[JobEvent], None]] = []
        self._lock = threading.Lock()
        self._future: concurrent.futures.Future[JobResult] = concurrent.futures.Future()
        self.cancel_requested = threading.Event()
        self.handed_off = threading.Event()  # the exit hooks gave this job to a reaper: hands off
        self._show: Callable[[], bool] | None = None  # displays the job's live view (see _ipython_display_)
        self.output_bytes = 0  # what the remote sent as output and displays (a kept machine's ledger shows it)

    # -- produced on the loop thread ------------------------------------------------------------------------

    def remote_output(self, stream: str, text: str) -> None:
        """The cell's output, as the instance sent it: emitted while within the notebook's bounds."""
        self.output_bytes += len(text.encode("utf-8", "replace"))
        for name, shown in self._output.feed(stream, text):
            self.emit(EventType.OUTPUT, stream=name, text=shown)

    def remote_display(self, data: dict[str, Any]) -> None:
        """What the cell displayed (an inert bundle): emitted while within the notebook's bounds, as output is."""
        self.output_bytes += sum(len(str(v)) for v in data.values())
        if self._output.admit(data):
            self.emit(EventType.DISPLAY, data=data)

    def emit(self, type: EventType, **fields: Any) -> JobEvent:
        if type in _OUTPUT_OVER:
            for name, shown in self._output.finish():  # the kept tail of the output, before the end of the job
                self.emit(EventType.OUTPUT, stream=name, text=shown)
        event = JobEvent(type=type, job_id=self.id, **fields)
        with self._lock:
            if type is EventType.PROGRESS and self._progress_at is not None:
                self._events[self._progress_at] = event  # listeners see every one; the history keeps the latest
            else:
                if type is EventType.PROGRESS:
                    self._progress_at = len(self._events)
                self._events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken view must never break the job
                import logging

                logging.getLogger(__name__).exception("job listener failed")
        return event

    def _finish(self, result: JobResult) -> None:
        if not self._future.done():
            self._future.set_result(result)

    # -- read from anywhere ---------------------------------------------------------------------------------

    @property
    def events(self) -> list[JobEvent]:
        with self._lock:
            return list(self._events)

    @property
    def status(self) -> JobStatus:
        if self._future.done():
            return self._future.result().status
        started = any(e.type is EventType.STARTED for e in self.events)
        return JobStatus.RUNNING if started else JobStatus.QUEUED

    def done(self) -> bool:
        return self._future.done()

    def add_listener(self, listener: Callable[[JobEvent], None], *, replay: bool = True) -> Callable[[], None]:
        """Call ``listener(event)`` on the loop thread for every event (past ones first when ``replay``)."""
        with self._lock:
            past = list(self._events) if replay else []
            self._listeners.append(listener)
        for event in past:
            listener(event)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    def result(self, timeout: float | None = None) -> JobResult:
        """The result once done (blocks up to ``timeout``; raises TimeoutError)."""
        return self._future.result(timeout)

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends, in short slices so Ctrl-C gets through; Ctrl-C cancels the job, waits for
        its clean-up (sync back, terminate, settle) and then raises :class:`JobInterrupted` (a KeyboardInterrupt)
        saying so in one line."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._future.done():
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} still running after {timeout} s")
                concurrent.futures.wait([self._future], timeout=0.1)
        except KeyboardInterrupt:
            self.cancel()
            while not self._future.done():
                concurrent.futures.wait([self._future], timeout=0.1)
            raise self.interrupted(self._future.result()) from None
        return self._future.result()

    def interrupted(self, result: JobResult) -> JobInterrupted:
        """What Ctrl-C did, in one line: "burst: job j cancelled · synced back 3 files · terminated local instance
        j · settled $0.00"."""
        events = self.events
        seen = {e.type: e for e in events}
        if self.plan.on is not None:
            bits = [f"burst: cell {self.id} interrupted by Ctrl-C (KeyboardInterrupt on the machine)",
                    f"machine {self.plan.on.name} kept, its state with it"]
            if result.error is not None and not isinstance(result.error, JobCancelled):
                bits.append(f"error: {one_line(result.error)}")
            return JobInterrupted(" · ".join(bits))
        bits = [f"burst: job {self.id} {result.status.value.replace('_', ' ')} by Ctrl-C"]
        if EventType.SYNCING_DOWN in seen:
            bits.append(f"synced back {len(result.files)} file{'' if len(result.files) == 1 else 's'}")
        ended = seen.get(EventType.TERMINATED)
        if ended is not None:
            provider = next((e.provider for e in reversed(events) if e.provider), None)
            bits.append(" ".join(x for x in ("terminated", provider, "instance", ended.instance_id) if x))
        bits.append("cost not known yet (burst ledger)" if result.total_cost_usd is None
                    else f"settled {format_usd(result.total_cost_usd)}")
        if result.error is not None and not isinstance(result.error, JobCancelled):
            bits.append(f"error: {one_line(result.error)}")
        return JobInterrupted(" · ".join(bits))

    def cancel(self) -> None:
        """Stop the job: its rw mounts are synced back, the instance terminated and the bill settled."""
        # The lifecycle checks this between steps and on every 0.25 s tick of the stream.
        self.cancel_requested.set()

    def __await__(self) -> Generator[Any, None, JobResult]:
        return asyncio.wrap_future(self._future).__await__()

    async def stream_events(self) -> AsyncIterator[JobEvent]:
        """Every event of the job, past and future, on the caller's own event loop; ends after the final one."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        def forward(event: JobEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        remove = self.add_listener(forward)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.is_final:
                    return
        finally:
            remove()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status.value} ({self.spec.name})>"

    def shown_by(self, show: Callable[[], bool]) -> None:
        """Display the job with ``show`` (its live view; False where it displayed nothing) from now on."""
        self._show = show

    def _ipython_display_(self) -> None:
        """A job in a cell's ``Out`` shows as its view, which follows it to the end; the repr elsewhere."""
        if self._show is None or not self._show():
            from IPython.display import display

            display({"text/plain": repr(self)}, raw=True)  # type: ignore[no-untyped-call]
