"""JobView and BudgetBars without a kernel: real ipywidgets on ipywidgets' own DummyComm, an injected clock."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from burst_jupyter.events import EventType, JobEvent
from burst_jupyter.money import format_usd as format_money
from burst_jupyter.widgets import BudgetBars, JobView
from burst_jupyter.widgets.render import WIDGET_VIEW_MIMETYPE, ipython_kernel_present

E = EventType
SCRIPT = "<script>alert(1)</script>"
BOLD = "<b>x</b>"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ev(kind: EventType, **kw: Any) -> JobEvent:
    return JobEvent(type=kind, job_id="j1", **kw)


def make_view(clock: Clock, *, kernel: bool = False, cap: str | None = "1.00", name: str = "sweep") -> JobView:
    return JobView(
        job_id="j1",
        name=name,
        max_cost_usd=None if cap is None else Decimal(cap),
        clock=clock,
        kernel_present=lambda: kernel,
    )


def start(view: JobView, clock: Clock, rate: str = "0.40") -> None:
    """queued at t=0 … provisioned at t=2 … started at t=3."""
    view.handle(ev(E.QUEUED))
    view.handle(ev(E.OFFER_SELECTED, provider="local", gpu="RTX_4090", cost_per_hour_usd=Decimal(rate)))
    view.handle(ev(E.BUDGET_RESERVED, max_cost_usd=Decimal("1.00")))
    view.handle(ev(E.PROVISIONING, provider="local"))
    clock.now = 2.0
    view.handle(ev(E.PROVISIONED, provider="local", instance_id="i-1", gpu="RTX_4090", cost_per_hour_usd=Decimal(rate)))
    view.handle(ev(E.SSH_READY))
    view.handle(ev(E.SYNCING_UP))
    clock.now = 3.0
    view.handle(ev(E.STARTED))


def descendants(widget: Any) -> Iterator[Any]:
    yield widget
    for child in getattr(widget, "children", ()):
        yield from descendants(child)


def sent(widget: Any) -> int:
    return sum(len(w.comm.messages) for w in descendants(widget))


def parts(view: JobView) -> dict[str, Any]:
    status, progress_row, cost_row, last_output, protection = view.widget.children
    return {
        "status": status,
        "progress": progress_row.children[0],
        "progress_text": progress_row.children[1],
        "cost": cost_row.children[0],
        "cost_bar": cost_row.children[1],
        "elapsed": cost_row.children[2],
        "last_output": last_output,
        "protection": protection,
    }


# --- JobView state and snapshots --------------------------------------------------------------------------------


def test_event_sequence_drives_state_cost_and_elapsed() -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock)
    s = view.state
    assert (s.status, s.provider, s.instance_id, s.gpu, s.rate_per_hour_usd) == (
        "running",
        "local",
        "i-1",
        "RTX_4090",
        Decimal("0.40"),
    )

    view.handle(ev(E.OUTPUT, stream="stdout", text="epoch 1\nepoch 2\n"))
    view.handle(ev(E.PROGRESS, percent=33.0, message="epoch 2/6"))
    clock.now = 12.0
    view.tick()
    s = view.state
    assert s.last_output == "epoch 2"
    assert (s.percent, s.progress_message) == (33.0, "epoch 2/6")
    assert s.cost_usd == Decimal("0.40") * 10 / 3600  # 10 s since provisioned, in Decimal
    assert s.elapsed_s == 12.0
    assert view.snapshot_text() == (
        "burst job 'sweep' · running · local · RTX_4090 · $0.40/h · 33% epoch 2/6 · $0.0011 of $1.00 · 0:00:12"
    )

    view.handle(ev(E.PROGRESS, percent=66.0))
    view.handle(ev(E.PROGRESS, percent=100.0))
    view.handle(ev(E.SYNCING_DOWN))
    clock.now = 14.0
    view.handle(ev(E.TERMINATED, instance_id="i-1"))
    clock.now = 20.0
    view.tick()
    s = view.state
    assert s.cost_usd == Decimal("0.40") * 12 / 3600  # billing stopped at terminated
    assert s.elapsed_s == 20.0

    clock.now = 21.0
    view.handle(ev(E.COMPLETED, total_cost_usd=Decimal("0.0014")))
    view.handle(ev(E.OUTPUT, text="late chunk\n"))  # after the final event: ignored
    clock.now = 100.0
    view.tick()
    s = view.state
    assert (s.status, s.final, s.cost_usd, s.elapsed_s, s.last_output) == (
        "completed",
        True,
        Decimal("0.0014"),
        21.0,
        "epoch 2",
    )
    assert view.snapshot_text() == (
        "burst job 'sweep' · completed · local · RTX_4090 · $0.40/h · 100% · $0.0014 of $1.00 · 0:00:21"
    )


def test_remote_text_is_escaped_in_html_and_cleaned_of_terminal_escapes() -> None:
    clock = Clock()
    view = make_view(clock, name=BOLD)
    start(view, clock)
    view.handle(ev(E.PROGRESS, percent=50.0, message=BOLD))
    view.handle(ev(E.OUTPUT, text=f"\x1b[31m{SCRIPT}\x1b[0m\n"))
    view.handle(ev(E.FAILED, error=f"{SCRIPT} {BOLD}"))

    html = view.snapshot_html()
    assert "<script" not in html and BOLD not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # last output and error
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    assert view.state.last_output == SCRIPT  # colour codes dropped, text kept verbatim
    assert view.snapshot_text().endswith(f"\nerror: {SCRIPT} {BOLD}")  # plain text is never interpreted


def test_last_output_is_one_trimmed_line() -> None:
    clock = Clock()
    view = make_view(clock)
    view.handle(ev(E.OUTPUT, text="x" * 500 + "\n\n"))
    assert len(view.state.last_output or "") == 200 and (view.state.last_output or "").endswith("…")
    view.handle(ev(E.OUTPUT, text=" 10%|#   \r 20%|##  \r"))  # tqdm redraws with carriage returns
    assert view.state.last_output == "20%|##"
    view.handle(ev(E.OUTPUT, text="\n"))
    assert view.state.last_output == "20%|##"


def test_side_events_do_not_hide_the_phase() -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock)
    view.handle(ev(E.BUDGET_WARNING, message="today is at 85% of its cap"))
    assert (view.state.status, view.state.warning) == ("running", "today is at 85% of its cap")
    before = view.state
    view.handle(ev(E.RECONNECTING))
    assert (before.status, view.state.status) == ("running", "reconnecting")  # state is a copy, not a live alias
    view.handle(ev(E.OUTPUT, text="back\n"))
    assert view.state.status == "running"


def test_text_lines_for_terminal_mode() -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock)
    assert view.text_line(ev(E.OUTPUT, text="hi\n")) is None
    assert view.text_line(ev(E.PROGRESS, percent=5.0)) is None
    queued = view.text_line(ev(E.QUEUED, provider="local", max_cost_usd=Decimal(1)))
    assert queued == f"job 'sweep' ({view.state.job_id}) · queued · local · cap $1.00"
    line = view.text_line(ev(E.PROVISIONED, provider="local", cost_per_hour_usd=Decimal("0.40")))
    assert line == "machine started · local · $0.40/h"
    clock.now = 65.0
    final = ev(E.FAILED, total_cost_usd=Decimal("0.00694"), error="\x1b[2Jboom")
    expected = f"job 'sweep' ({view.state.job_id}) · failed · total $0.0069 · 0:01:05 · error: boom"
    assert view.text_line(final) == expected


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("12.5", "$12.50"),
        ("1234.5", "$1234.50"),
        ("0.01", "$0.01"),
        ("0.009999", "$0.01"),
        ("0.0042", "$0.0042"),
        ("0.00416", "$0.0042"),
        ("0.004", "$0.004"),
        ("0.000111", "$0.00011"),
        ("0.00004", "$0.00004"),
        ("0", "$0.00"),
    ],
)
def test_money_formatting(amount: str, text: str) -> None:
    assert format_money(Decimal(amount)) == text


# --- JobView widget ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("dummy_comm")
def test_widget_children_follow_the_job() -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock)
    p = parts(view)
    view.handle(ev(E.OUTPUT, text=SCRIPT + "\n"))
    clock.now = 12.0
    view.handle(ev(E.PROGRESS, percent=33.0))

    assert p["status"].value == "<b>burst job &#x27;sweep&#x27;</b> · running · local · RTX_4090 · $0.40/h"
    assert (p["progress"].value, p["progress"].bar_style, p["progress_text"].value) == (33.0, "", "33%")
    assert (p["cost"].value, p["cost_bar"].bar_style, p["elapsed"].value) == ("$0.0011 of $1.00", "success", "0:00:12")
    assert p["last_output"].value == "<code>&lt;script&gt;alert(1)&lt;/script&gt;</code>"

    view.handle(ev(E.COMPLETED, total_cost_usd=Decimal("0.0014")))
    assert (p["progress"].value, p["progress"].bar_style, p["cost"].value) == (100.0, "success", "$0.0014 of $1.00")


@pytest.mark.usefixtures("dummy_comm")
@pytest.mark.parametrize(
    ("final", "style"),
    [(E.COMPLETED, "success"), (E.FAILED, "danger"), (E.BUDGET_KILLED, "danger"), (E.CANCELLED, "warning")],
)
def test_final_event_sets_progress_bar_style(final: EventType, style: str) -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock)
    view.handle(ev(final))
    assert parts(view)["progress"].bar_style == style


@pytest.mark.usefixtures("dummy_comm")
@pytest.mark.parametrize(("seconds", "style"), [(799.0, "success"), (800.0, "warning"), (1000.0, "danger")])
def test_cost_bar_warns_at_80_percent_of_cap(seconds: float, style: str) -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock, rate="3.60")  # $0.001 a second against a $1.00 cap
    clock.now = 2.0 + seconds
    view.tick()
    bar = parts(view)["cost_bar"]
    assert (bar.bar_style, bar.value) == (style, min(seconds / 10, 100.0))


@pytest.mark.usefixtures("dummy_comm")
def test_no_cap_shows_cost_without_bar_fill() -> None:
    clock = Clock()
    view = JobView(job_id="j1", name="sweep", max_cost_usd=None, clock=clock, kernel_present=lambda: False)
    view.handle(ev(E.PROVISIONED, cost_per_hour_usd=Decimal("36")))
    clock.now = 10.0
    view.tick()
    p = parts(view)
    assert (p["cost"].value, p["cost_bar"].value, p["cost_bar"].bar_style) == ("$0.10", 0.0, "")


@pytest.mark.usefixtures("dummy_comm")
def test_widget_writes_are_throttled_and_the_final_state_is_exact() -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock)
    widget = view.widget
    before = sent(widget)
    for i in range(1000):  # one second of progress at 1 kHz
        clock.now = 3.0 + i / 1000
        view.handle(ev(E.PROGRESS, percent=i / 10))
    burst = sent(widget) - before
    assert 5 <= burst <= 60  # ~10 renders, a few widgets each; 1000 events unthrottled would be thousands
    assert parts(view)["progress"].value < 99.9  # the last few events are still held back…
    view.tick()
    assert parts(view)["progress"].value == 99.9  # …until the heartbeat flushes them

    for _ in range(1000):  # a frozen clock: nothing reaches the widget…
        view.handle(ev(E.PROGRESS, percent=42.0))
    assert parts(view)["progress"].value == 99.9
    view.handle(ev(E.CANCELLED))  # …except the final event, at once
    assert (parts(view)["progress"].value, parts(view)["progress"].bar_style) == (42.0, "warning")


@pytest.mark.usefixtures("dummy_comm")
def test_one_render_sends_one_message_per_changed_widget() -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock)
    widget = view.widget
    before = sent(widget)
    clock.now = 10.0
    view.handle(ev(E.PROGRESS, percent=50.0, message="half"))  # progress bar and text, cost text and bar, elapsed
    assert sent(widget) - before == 5
    view.tick()  # nothing changed since
    assert sent(widget) - before == 5


@pytest.mark.usefixtures("dummy_comm")
def test_close_closes_every_widget() -> None:
    view = make_view(Clock())
    widgets = list(descendants(view.widget))
    view.close()
    assert all(w.comm is None for w in widgets)


# --- mimebundle -------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("dummy_comm")
def test_mimebundle_has_widget_view_only_with_a_kernel() -> None:
    clock = Clock()
    assert set(make_view(clock)._repr_mimebundle_()) == {"text/html", "text/plain"}

    view = make_view(clock, kernel=True)
    bundle = view._repr_mimebundle_()
    assert set(bundle) == {WIDGET_VIEW_MIMETYPE, "text/html", "text/plain"}
    assert bundle[WIDGET_VIEW_MIMETYPE] == {"version_major": 2, "version_minor": 0, "model_id": view.widget.model_id}
    assert bundle["text/plain"] == view.snapshot_text()
    assert set(view._repr_mimebundle_(include={"text/plain"})) == {"text/plain"}
    assert set(view._repr_mimebundle_(exclude={WIDGET_VIEW_MIMETYPE})) == {"text/html", "text/plain"}


def test_without_ipywidgets_views_fall_back_to_html_and_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # makes `import ipywidgets` fail
    view = make_view(Clock(), kernel=True)
    assert set(view._repr_mimebundle_()) == {"text/html", "text/plain"}
    with pytest.raises(ImportError):
        _ = view.widget


def test_default_kernel_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert ipython_kernel_present() is False
    monkeypatch.setattr(IPython, "get_ipython", lambda: SimpleNamespace())  # terminal IPython: no kernel
    assert ipython_kernel_present() is False
    monkeypatch.setattr(IPython, "get_ipython", lambda: SimpleNamespace(kernel=object()))
    assert ipython_kernel_present() is True


def test_importing_the_views_does_not_import_ipywidgets() -> None:
    code = "import sys, burst_jupyter.widgets; print('ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- BudgetBars -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    period: str
    spent: Decimal
    reserved: Decimal
    cap: Decimal | None
    title: str | None = None  # labels may carry user-chosen names, so they are escaped like remote text

    @property
    def fraction(self) -> float | None:
        return None if self.cap is None else float((self.spent + self.reserved) / self.cap)

    @property
    def warning(self) -> bool:
        return self.fraction is not None and self.fraction >= 0.8

    @property
    def label(self) -> str:
        name = self.title or ("Today" if self.period == "day" else "This week")
        if self.cap is None or self.fraction is None:
            return f"{name}: {format_money(self.spent)}"
        return f"{name}: {format_money(self.spent)} / {format_money(self.cap)} ({self.fraction:.0%})"


@dataclass(frozen=True)
class Snapshot:
    day: Period
    week: Period


def snapshot(day: str, week: str, *, day_cap: str | None = "50", week_cap: str | None = "200") -> Snapshot:
    def period(name: str, spent: str, cap: str | None) -> Period:
        return Period(name, Decimal(spent), Decimal(0), None if cap is None else Decimal(cap))

    return Snapshot(period("day", day, day_cap), period("week", week, week_cap))


def test_budget_bars_text_and_html() -> None:
    bars = BudgetBars(snapshot("12.50", "87.30"), kernel_present=lambda: False)
    assert bars.snapshot_text() == "Today: $12.50 / $50.00 (25%)\nThis week: $87.30 / $200.00 (44%)"
    html = bars.snapshot_html()
    assert "width:25.0%" in html and "width:43.6%" in html and "#4caf50" in html  # two green bars
    assert set(bars._repr_mimebundle_()) == {"text/html", "text/plain"}

    bars.update(snapshot("45", "100", week_cap=None))
    html = bars.snapshot_html()
    assert "#ff9800" in html and "width:90.0%" in html  # today warns at >= 80 %
    assert "width:0.0%" in html and bars.snapshot_text().endswith("This week: $100.00")  # no cap: no fill


@pytest.mark.usefixtures("dummy_comm")
@pytest.mark.parametrize(
    ("spent", "style", "value"), [("39.99", "success", 79.98), ("40", "warning", 80.0), ("60", "danger", 100.0)]
)
def test_budget_bar_styles(spent: str, style: str, value: float) -> None:
    bars = BudgetBars(snapshot(spent, "10", week_cap=None), kernel_present=lambda: True)
    (day_bar, day_label), (week_bar, _) = (row.children for row in bars.widget.children)
    assert (day_bar.bar_style, day_bar.value) == (style, pytest.approx(value))
    assert (week_bar.bar_style, week_bar.value) == ("", 0.0)
    assert day_label.value.startswith("Today: ")
    assert WIDGET_VIEW_MIMETYPE in bars._repr_mimebundle_()


@pytest.mark.usefixtures("dummy_comm")
def test_budget_bars_update_the_widget_in_place_and_escape_labels() -> None:
    bars = BudgetBars(snapshot("5", "10"), kernel_present=lambda: True)
    widget = bars.widget
    bars.update(snapshot("45", "10"))
    (day_bar, day_label), _ = (row.children for row in widget.children)
    assert bars.widget is widget
    assert (day_bar.bar_style, day_label.value) == ("warning", "Today: $45.00 / $50.00 (90%)")

    bars.update(Snapshot(Period("day", Decimal(1), Decimal(0), None, title=SCRIPT), snapshot("1", "1").week))
    assert day_label.value == "&lt;script&gt;alert(1)&lt;/script&gt;: $1.00"
    assert "<script" not in bars.snapshot_html()
