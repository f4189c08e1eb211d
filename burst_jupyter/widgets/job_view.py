"""JobView: one job's live status, progress, running cost against its cap, and last line of remote output.

It only renders the JobEvent stream; the caller feeds it events (``handle``) and a heartbeat (``tick``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Collection
from decimal import Decimal
from html import escape
from typing import Any

from burst_jupyter.events import EventType, JobEvent
from burst_jupyter.money import format_rate, format_usd
from burst_jupyter.widgets.render import (
    WIDGET_VIEW_MIMETYPE,
    LiveView,
    bar_style,
    clean_text,
    format_duration,
    html_bar,
    ipython_kernel_present,
    set_bar,
)

__all__ = ["JobView", "JobViewState"]

# Widget comm messages go out on IOPub one by one; ~10 Hz is what tqdm.notebook settles on and reads as live.
_MIN_SYNC_INTERVAL_S = 0.1
_LAST_OUTPUT_CHARS = 200
# A line still being written is held (per stream) until its end arrives: a cell's print() reaches the view in
# several writes ("working", " ", "2", "\n"). Held up to what a shown line can use, so a cell that never ends a
# line costs no more than that.
_PENDING_CHARS = _LAST_OUTPUT_CHARS + 1
_QUIET_EVENTS = frozenset({EventType.OUTPUT, EventType.DISPLAY, EventType.PROGRESS})
_FINAL_BAR_STYLES = {"completed": "success", "failed": "danger", "budget_killed": "danger", "cancelled": "warning"}
# What each phase means, in words (the event names are the API's; these are what a user reads).
_PHASES = {
    "pending": "waiting",
    "budget_reserved": "cost cap set aside",
    "provisioning": "starting a machine",
    "provisioned": "machine started",
    "ssh_ready": "connected",
    "syncing_up": "uploading files",
    "preempted": "machine taken back by the provider",
    "syncing_down": "bringing results back",
    "terminated": "machine ended",
    "budget_killed": "stopped at its cost cap",
}


def _phase_words(status: str) -> str:
    """A status as a user reads it: "starting a machine" for ``provisioning``."""
    return _PHASES.get(status, status.replace("_", " "))


@dataclasses.dataclass(slots=True)
class JobViewState:
    """Everything a JobView shows, derived from events and clock readings only (no widgets, no I/O).

    ``cost_usd`` is the hourly rate times the time since ``provisioned`` (until ``terminated``), replaced by the
    provider's total at the final event. ``elapsed_s`` counts from ``queued`` and freezes at the final event.
    """

    job_id: str
    name: str
    cap_usd: Decimal | None
    status: str = "pending"
    provider: str | None = None
    instance_id: str | None = None
    gpu: str | None = None
    rate_per_hour_usd: Decimal | None = None
    percent: float | None = None
    progress_message: str | None = None
    cost_usd: Decimal = Decimal(0)
    elapsed_s: float = 0.0
    last_output: str | None = None
    warning: str | None = None
    protection: str | None = None  # what happens if the notebook dies, in one line (the protected event)
    protection_detail: str | None = None  # the layers behind that line, shown on hover or expand
    error: str | None = None
    final: bool = False
    queued_at: float | None = None
    billing_since: float | None = None
    billing_until: float | None = None
    earlier_attempts_usd: Decimal = Decimal(0)  # what instances lost to preemption cost (the preempted event)
    pending_output: dict[str, str] = dataclasses.field(default_factory=dict)  # per stream: a line not yet ended

    @property
    def cost_fraction(self) -> float | None:
        """Cost over cap, for bars only (the displayed amounts stay Decimal)."""
        if self.cap_usd is None or self.cap_usd <= 0:
            return None
        return float(self.cost_usd / self.cap_usd)

    def elapsed_at(self, now: float) -> float:
        if self.final or self.queued_at is None:
            return self.elapsed_s
        return now - self.queued_at

    def apply(self, event: JobEvent, now: float) -> None:
        """Fold one event in; ``now`` is the view's clock when the event arrived."""
        if self.final:
            return  # the final event is the last word: a straggling output chunk must not un-freeze the totals
        if self.queued_at is None:
            self.queued_at = now
        self.provider = event.provider or self.provider
        self.instance_id = event.instance_id or self.instance_id
        self.gpu = event.gpu or self.gpu
        if event.max_cost_usd is not None:
            self.cap_usd = event.max_cost_usd
        if event.cost_per_hour_usd is not None:  # offer_selected may quote it; billing starts at provisioned
            self.rate_per_hour_usd = event.cost_per_hour_usd
        if event.error:
            self.error = clean_text(event.error)
        self._apply_type(event, now)
        self.refresh(now)
        if event.is_final:
            if event.total_cost_usd is not None:
                self.cost_usd = event.total_cost_usd
            for rest in self.pending_output.values():  # the cell's last words, even without a newline
                self.last_output = _last_line(rest) or self.last_output
            self.pending_output = {}
            self.final = True

    def _apply_type(self, event: JobEvent, now: float) -> None:
        kind = event.type
        if kind in _QUIET_EVENTS:
            if self.status == "reconnecting":
                self.status = "running"  # data flowing again is the only "reconnected" signal the stream has
            if kind is EventType.OUTPUT:
                self._output(event.stream or "stdout", event.text or "")
            elif kind is EventType.PROGRESS:
                self.percent = event.percent if event.percent is not None else self.percent
                self.progress_message = clean_text(event.message) if event.message else None
        elif kind is EventType.BUDGET_WARNING:
            # A warning is a side note, not a phase: it can arrive mid-run and must not hide "running".
            self.warning = clean_text(event.message or event.describe())
        elif kind is EventType.PROTECTED:  # a side note too
            self.protection = clean_text(event.message) if event.message else None
            self.protection_detail = clean_text(event.text) if event.text else None
        elif kind is EventType.SYNCED:
            pass  # a periodic pull while running: the text view prints it; the phase stays "running"
        else:
            self.status = "running" if kind is EventType.STARTED else kind.value
            if kind is EventType.PROVISIONED and self.billing_since is None:
                self.billing_since = now  # a re-quoted rate (provisioned again) bills on from the same start
            elif kind is EventType.TERMINATED:
                self.billing_until = now
            elif kind is EventType.PREEMPTED:
                # That instance is ended and billed; the next one, if any, bills from its own provisioned event.
                self.earlier_attempts_usd = event.cost_so_far_usd or self.cost_usd
                self.billing_since = None

    def _output(self, stream: str, text: str) -> None:
        """Show the last whole line: a carriage return ends one too (tqdm redraws with it)."""
        pending = self.pending_output.get(stream, "") + text
        cut = max(pending.rfind("\n"), pending.rfind("\r"))
        if cut >= 0:
            self.last_output = _last_line(pending[:cut]) or self.last_output
        self.pending_output[stream] = pending[cut + 1:][:_PENDING_CHARS]

    def refresh(self, now: float) -> None:
        """Bring elapsed time and running cost up to ``now`` (no-op once final)."""
        if self.final:
            return
        self.elapsed_s = self.elapsed_at(now)
        if self.rate_per_hour_usd is not None and self.billing_since is not None:
            until = self.billing_until if self.billing_until is not None else now
            billed_s = Decimal(f"{max(until - self.billing_since, 0.0):.3f}")
            self.cost_usd = self.earlier_attempts_usd + self.rate_per_hour_usd * billed_s / 3600


def _last_line(text: str) -> str | None:
    """The last non-blank line, cut to ~200 chars; a carriage return starts a new line (tqdm redraws with it)."""
    for line in reversed(clean_text(text.replace("\r", "\n")).split("\n")):
        if line.strip():
            line = line.strip()
            return line if len(line) <= _LAST_OUTPUT_CHARS else line[: _LAST_OUTPUT_CHARS - 1] + "…"
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Facts:
    """The state as display strings (plain text, not yet escaped), shared by text, HTML and the widget."""

    title: str
    status: str
    where: str
    rate: str
    progress: str
    cost: str
    elapsed: str


def _facts(s: JobViewState) -> _Facts:
    progress = "" if s.percent is None else f"{s.percent:.0f}%"
    if s.progress_message:
        progress = f"{progress} {s.progress_message}".strip()
    cost = format_usd(s.cost_usd) + ("" if s.cap_usd is None else f" of {format_usd(s.cap_usd)}")
    return _Facts(
        title=f"burst job {s.name!r}",
        status=_phase_words(s.status),
        where=" · ".join(x for x in (s.provider, s.gpu) if x),
        rate="" if s.rate_per_hour_usd is None else f"{format_rate(s.rate_per_hour_usd)}/h",
        progress=progress,
        cost=cost,
        elapsed=format_duration(s.elapsed_s),
    )


class JobView(LiveView):
    """Live view of one job: feed it events with ``handle`` and call ``tick`` about once a second.

    ``handle`` and ``tick`` must come from one writer thread (the runner's loop thread); reading snapshots or
    displaying the view from another thread is safe. Widget writes are throttled to ~10 Hz, except the final
    event and ``tick``, which always reach the widget at once.

    Example:
        >>> view = JobView(job_id="j1", name="sweep", max_cost_usd=Decimal("1"), clock=lambda: 0.0)
        >>> view.handle(JobEvent(type=EventType.QUEUED, job_id="j1"))
        >>> view.snapshot_text()
        "burst job 'sweep' · queued · $0.00 of $1.00 · 0:00:00"
    """

    def __init__(
        self,
        *,
        job_id: str,
        name: str,
        max_cost_usd: Decimal | None,
        clock: Callable[[], float] = time.monotonic,
        kernel_present: Callable[[], bool] = ipython_kernel_present,
    ) -> None:
        super().__init__(kernel_present=kernel_present)
        self._clock = clock
        self._state = JobViewState(job_id=job_id, name=name, cap_usd=max_cost_usd)
        self._parts: _JobWidgets | None = None
        self._last_sync: float | None = None

    @property
    def state(self) -> JobViewState:
        """A copy of the current state, consistent even while the writer thread is mid-update."""
        with self._lock:
            return dataclasses.replace(self._state, pending_output=dict(self._state.pending_output))

    def handle(self, event: JobEvent) -> None:
        """Fold ``event`` into the state and, if the widget exists, into the widget (throttled unless final)."""
        with self._lock:
            self._state.apply(event, self._clock())
            self._sync(force=event.is_final)

    def tick(self) -> None:
        """Advance elapsed time and running cost, and flush any throttled widget update."""
        with self._lock:
            self._state.refresh(self._clock())
            self._sync(force=True)

    def text_line(self, event: JobEvent) -> str | None:
        """The line a terminal should print for ``event``, or None for output and progress (shown elsewhere)."""
        if event.type in _QUIET_EVENTS:
            return None
        title = f"job {self._state.name!r} ({self._state.job_id})"
        if event.type is EventType.PROTECTED and event.message:
            return clean_text(event.message)
        if event.type is EventType.PROVISIONING and event.provider:
            # The provider's own status words ("success, running") are quoted as the provider's, not as ours.
            said = f" ({event.provider} says: {event.message})" if event.message else ""
            return clean_text(f"starting a machine on {event.provider}{said}")
        if not event.is_final:
            # The first line names the job; the rest are short (the [burst] prefix already says whose they are).
            # describe() starts with the event's name; a user reads the phase in words.
            text = _phase_words(event.type.value) + event.describe()[len(event.type.value):]
            return clean_text(f"{title} · {text}" if event.type is EventType.QUEUED else text)
        with self._lock:
            elapsed = self._state.elapsed_at(self._clock())
        bits = [title, _phase_words(event.type.value)]
        if event.total_cost_usd is not None:
            bits.append(f"total {format_usd(event.total_cost_usd)}")
        bits.append(format_duration(elapsed))
        if event.error:
            bits.append(f"error: {event.error}")
        return clean_text(" · ".join(bits))

    def snapshot_text(self) -> str:
        with self._lock:
            f = _facts(self._state)
            error = self._state.error
        line = " · ".join(x for x in (f.title, f.status, f.where, f.rate, f.progress, f.cost, f.elapsed) if x)
        return line if error is None else f"{line}\nerror: {error}"

    def snapshot_html(self) -> str:
        with self._lock:
            s = self._state
            f = _facts(s)
            where = " · ".join(x for x in (f.where, s.instance_id, f.rate) if x)
            rows = [
                ("Status", escape(f.status)),
                ("Where", escape(where)) if where else None,
                ("Progress", html_bar(_bar_percent(s) / 100, _progress_style(s)) + " " + escape(f.progress)),
                ("Cost", html_bar(s.cost_fraction, bar_style(s.cost_fraction)) + " " + escape(f.cost)),
                ("Elapsed", escape(f.elapsed)),
                ("Last output", f"<code>{escape(s.last_output)}</code>") if s.last_output else None,
                ("Warning", escape(s.warning)) if s.warning else None,
                ("Safeguards", _protection_html(s)) if s.protection else None,
                ("Error", f'<span style="color:#c62828">{escape(s.error)}</span>') if s.error else None,
            ]
        body = "".join(
            f'<tr><th style="text-align:left;padding-right:1em">{k}</th><td style="text-align:left">{v}</td></tr>'
            for k, v in filter(None, rows)
        )
        return f'<div class="burst-job"><b>{escape(f.title)}</b><table>{body}</table></div>'

    def _repr_mimebundle_(
        self, include: Collection[str] | None = None, exclude: Collection[str] | None = None
    ) -> dict[str, Any]:
        """Once the job has ended, only the snapshots: nothing changes any more, and a saved or exported notebook
        (nbconvert HTML, GitHub, one reopened without widget state) then shows how the job ended, where a widget
        view would draw nothing or "model not found"."""
        with self._lock:
            final = self._state.final
        if final:
            exclude = {*(exclude or ()), WIDGET_VIEW_MIMETYPE}
        return super()._repr_mimebundle_(include, exclude)

    def _sync(self, *, force: bool) -> None:
        if self._parts is None:
            return
        now = self._clock()
        if not force and self._last_sync is not None and now - self._last_sync < _MIN_SYNC_INTERVAL_S:
            return  # the next event after the interval, the final event or tick() carries this change
        self._render_widget()
        self._last_sync = now

    def _build_widget(self) -> Any:
        import ipywidgets as w  # lazy: keeps `import burst_jupyter` and %load_ext free of ipywidgets

        bar_layout = w.Layout(width="16em")
        self._parts = _JobWidgets(
            status=w.HTML(),
            progress=w.FloatProgress(min=0, max=100, layout=bar_layout),
            progress_text=w.HTML(),
            cost=w.HTML(),
            cost_bar=w.FloatProgress(min=0, max=100, layout=w.Layout(width="8em")),
            elapsed=w.HTML(),
            last_output=w.HTML(),
            protection=w.HTML(),
        )
        p = self._parts
        return w.VBox(
            [
                p.status,
                w.HBox([p.progress, p.progress_text]),
                w.HBox([p.cost, p.cost_bar, p.elapsed]),
                p.last_output,
                p.protection,
            ]
        )

    def _render_widget(self) -> None:
        p = self._parts
        if p is None:
            return
        s = self._state
        f = _facts(s)
        status = " · ".join(escape(x) for x in (f.status, f.where, f.rate) if x)
        extra = "".join(
            f' · <span style="color:{colour}">{escape(text)}</span>'
            for colour, text in (("#e65100", s.warning), ("#c62828", s.error))
            if text
        )
        with contextlib.ExitStack() as stack:
            # One state message per changed widget per render, however many traits change.
            for part in p.all():
                stack.enter_context(part.hold_sync())
            p.status.value = f"<b>{escape(f.title)}</b> · {status}{extra}"
            set_bar(p.progress, _bar_percent(s) / 100, _progress_style(s))
            p.progress_text.value = escape(f.progress)
            p.cost.value = escape(f.cost)
            set_bar(p.cost_bar, s.cost_fraction, bar_style(s.cost_fraction))
            p.elapsed.value = escape(f.elapsed)
            p.last_output.value = f"<code>{escape(s.last_output or '')}</code>"
            p.protection.value = f"<small>{_protection_html(s)}</small>" if s.protection else ""


@dataclasses.dataclass(frozen=True, slots=True)
class _JobWidgets:
    status: Any
    progress: Any
    progress_text: Any
    cost: Any
    cost_bar: Any
    elapsed: Any
    last_output: Any
    protection: Any

    def all(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _protection_html(s: JobViewState) -> str:
    """The one line, and the layers behind it one click (or a hover) away."""
    line = escape(s.protection or "")
    if not s.protection_detail:
        return line
    detail = escape(s.protection_detail)
    return (f'<details style="display:inline"><summary title="{detail}" style="cursor:pointer">{line}</summary>'
            f"{detail}</details>")


def _bar_percent(s: JobViewState) -> float:
    # A completed job fills its bar even if the code never reported progress.
    return 100.0 if s.status == "completed" else s.percent or 0.0


def _progress_style(s: JobViewState) -> str:
    return _FINAL_BAR_STYLES.get(s.status, "") if s.final else ""
