"""What the job view says, without a kernel: whole output lines, its phases in words, and how it ends (snapshots
only, so a saved or exported notebook shows them). Real ipywidgets on ipywidgets' own DummyComm, a fixed clock."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from test_widgets import Clock, ev, make_view, start

from burst_jupyter.events import EventType
from burst_jupyter.widgets.render import WIDGET_VIEW_MIMETYPE

E = EventType


def test_the_last_line_is_a_whole_line_however_the_cell_wrote_it() -> None:
    clock = Clock()
    view = make_view(clock)
    start(view, clock)
    shown = []
    # print("working", i) reaches the view as separate writes: the words, the separator, the number, the newline.
    for i in range(3):
        for piece in ("working", " ", str(i), "\n"):
            view.handle(ev(E.OUTPUT, stream="stdout", text=piece))
            shown.append(view.state.last_output)
    assert set(shown) == {None, "working 0", "working 1", "working 2"}
    assert view.state.last_output == "working 2"
    # A line that is not ended yet waits; another stream's line does not mix into it.
    view.handle(ev(E.OUTPUT, stream="stdout", text="epoch 3: loss 0."))
    view.handle(ev(E.OUTPUT, stream="stderr", text="warning: slow\n"))
    assert view.state.last_output == "warning: slow"
    view.handle(ev(E.OUTPUT, stream="stdout", text="25\n"))
    assert view.state.last_output == "epoch 3: loss 0.25"
    # What the cell printed last without a newline shows once the job has ended.
    view.handle(ev(E.OUTPUT, stream="stdout", text="done, no newline"))
    assert view.state.last_output == "epoch 3: loss 0.25"
    view.handle(ev(E.COMPLETED, total_cost_usd=Decimal(0)))
    assert view.state.last_output == "done, no newline"


def test_a_line_that_never_ends_is_held_bounded() -> None:
    clock = Clock()
    view = make_view(clock)
    for _ in range(100):
        view.handle(ev(E.OUTPUT, stream="stdout", text="x" * 10_000))
    assert len(view.state.pending_output["stdout"]) <= 201
    view.handle(ev(E.OUTPUT, stream="stdout", text="\n"))
    line = view.state.last_output or ""
    assert len(line) == 200 and line.endswith("…")


def test_phases_read_as_words_and_a_provider_status_is_quoted_as_its_own() -> None:
    clock = Clock()
    view = make_view(clock)
    view.handle(ev(E.QUEUED))
    event = ev(E.PROVISIONING, provider="vast", message="success, running")
    view.handle(event)
    assert view.text_line(event) == "starting a machine on vast (vast says: success, running)"
    assert view.snapshot_text().startswith("burst job 'sweep' · starting a machine · vast · ")
    assert view.text_line(ev(E.PROVISIONING, provider="vast")) == "starting a machine on vast"
    view.handle(ev(E.SYNCING_UP))
    assert " · uploading files · " in view.snapshot_text()
    clock.now = 5.0
    killed = ev(E.BUDGET_KILLED, total_cost_usd=Decimal("1.00"))
    view.handle(killed)
    assert " · stopped at its cost cap · " in view.snapshot_text()
    assert (view.text_line(killed) or "").endswith(" · stopped at its cost cap · total $1.00 · 0:00:05")


@pytest.mark.usefixtures("dummy_comm")
def test_an_ended_job_shows_as_its_snapshots_only() -> None:
    """A live widget while the job runs; once it ended, text/html and text/plain alone, so a notebook saved or
    exported with whatever widget state it has still shows how the job ended."""
    clock = Clock()
    view = make_view(clock, kernel=True)
    start(view, clock)
    running: dict[str, Any] = view._repr_mimebundle_()
    assert WIDGET_VIEW_MIMETYPE in running
    view.handle(ev(E.OUTPUT, text="working 2\n"))
    view.handle(ev(E.COMPLETED, total_cost_usd=Decimal(0)))
    ended: dict[str, Any] = view._repr_mimebundle_()
    assert set(ended) == {"text/html", "text/plain"}
    assert "completed" in ended["text/plain"] and "working 2" in ended["text/html"]
