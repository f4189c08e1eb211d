"""The widgets in a real browser: JupyterLab (this venv's) in Debian's headless chromium, driven by playwright.

One notebook runs all its cells: a ``%%burst`` cell on the local provider that reports progress in five slow
steps, then ``burst.budget_bars()``. The DOM must show the JobView as a live widget (not its text/html or
text/plain snapshot) while the job runs, its progress bar at an intermediate value before the final one, then the
final snapshot saying "completed" (what a saved notebook keeps), the remote lines in the cell's output in order,
and the BudgetBars widget. Every wait polls the DOM
with a generous deadline; nothing asserts a duration. A screenshot of the finished notebook is saved in tmp.

The server and the browser come from tests/jupyter_servers.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from burst_checks import live_instances
from jupyter_servers import Server, chromium, jupyter_server, open_notebook, poll, run_all_cells, write_notebook
from kernels import local_job_dirs, wait_for

pytestmark = pytest.mark.browser

NOTEBOOK = "browser.ipynb"
STEPS = 5
FINAL_STATUSES = {"completed", "failed", "budget killed", "cancelled"}

BURST_CELL = f"""%%burst --provider local --max-cost 1 --name browser
import time

for step in range(1, {STEPS} + 1):
    print(f"remote line {{step}}")
    burst.progress(100 * step / {STEPS})
    time.sleep(1)
print("remote done")"""

# What the page reports about the JobView each poll: the widget's root (a VBox whose first child says
# "burst job"), its first FloatProgress (the job's progress; the second is the cost), and the status line.
JOB_VIEW_JS = """() => {
    const cells = document.querySelectorAll('.jp-Notebook .jp-CodeCell');
    const cell = cells[1];
    if (!cell) return null;
    const outputs = cell.querySelector('.jp-OutputArea');
    const root = [...cell.querySelectorAll('.jupyter-widgets.widget-vbox')]
        .find(box => box.innerText.includes('burst job'));
    const streams = [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type$="stdout"]')]
        .map(e => e.innerText).join('');
    const shown = outputs ? outputs.innerText : '';
    const errors = [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type$="stderr"]')]
        .map(e => e.innerText).join('');
    const snapshot = cell.querySelector('.jp-OutputArea .burst-job');
    if (!root) return {widget: false, outputs: shown, streams, errors, snapshotShown: !!snapshot,
                       snapshotText: snapshot ? snapshot.innerText : '',
                       progress: snapshot ? parseFloat(snapshot.querySelector('td div div').style.width) : null};
    const bar = root.querySelector('.progress .progress-bar');
    const htmls = [...root.querySelectorAll('.widget-html')].map(e => e.innerText);
    return {
        widget: true,
        outputs: shown,
        status: htmls[0] || '',
        progress: bar ? parseFloat(bar.style.width) : null,
        barClass: bar ? bar.className : '',
        bars: root.querySelectorAll('.progress .progress-bar').length,
        text: root.innerText,
        snapshotShown: !!cell.querySelector('.jp-OutputArea .burst-job'),
        errors,
        streams,
    };
}"""

BUDGET_JS = """() => {
    const cell = document.querySelectorAll('.jp-Notebook .jp-CodeCell')[2];
    if (!cell) return null;
    const root = cell.querySelector('.jp-OutputArea .jupyter-widgets.widget-vbox');
    return root ? {bars: root.querySelectorAll('.progress .progress-bar').length, text: root.innerText} : null;
}"""


def job_status(seen: dict[str, Any]) -> str:
    """The status in the JobView's first line: "burst job 'browser' · running · local · $0.00/h"."""
    parts = seen["status"].split(" · ")
    return parts[1] if len(parts) > 1 else ""


@pytest.fixture
def lab(tmp_path: Path, burst_home: Path) -> Iterator[Server]:
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / NOTEBOOK, "%load_ext burst_jupyter\nimport burst_jupyter as burst", BURST_CELL,
                   "burst.budget_bars()")
    with jupyter_server(tmp_path, burst_home, root) as server:
        yield server


def test_widgets_render_and_update_live_in_jupyterlab(lab: Server, tmp_path: Path, burst_home: Path) -> None:
    screenshot, running_shot = tmp_path / "browser-notebook.png", tmp_path / "browser-running.png"
    with chromium(lab) as (page, js_errors):
        open_notebook(page, lab, NOTEBOOK, cells=3)
        run_all_cells(page)

        seen: list[Any] = []
        # Mid-run: a bar between empty and full (or the end, if that was missed; asserted below).
        mid = poll(page, JOB_VIEW_JS, lambda s: s and s.get("widget") and (
            0 < (s["progress"] or 0) < 100 or job_status(s) in FINAL_STATUSES), timeout=60,
            what="the JobView's progress to move", seen=seen)
        if job_status(mid) not in FINAL_STATUSES:
            page.screenshot(path=str(running_shot), full_page=True)
            print(f"screenshot mid-run: {running_shot}")
        # The end: the widget's last state, then the final snapshot that replaces it (either may be missed).
        poll(page, JOB_VIEW_JS, lambda s: s and (s.get("snapshotShown") or (
            s.get("widget") and job_status(s) in FINAL_STATUSES)), timeout=60, what="the JobView to show the job's end",
            seen=seen)
        final = poll(page, JOB_VIEW_JS, lambda s: "remote done" in s["streams"] and s["snapshotShown"],
                     timeout=30, what="the remote output and the final view")
        budget = poll(page, BUDGET_JS, lambda s: s and s["bars"] == 2 and "week" in s["text"], timeout=30,
                      what="the BudgetBars widget")
        page.wait_for_timeout(300)  # let the last layout settle before the picture; nothing is asserted on it
        page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot of the finished notebook: {screenshot}")
    assert not js_errors, js_errors

    # While the job ran the JobView was a live widget, not its fallback: ipywidgets rendered it, and no text/html
    # snapshot showed.
    live = [s for s in seen if s and s.get("widget")]
    assert live and all(s["bars"] == 2 and not s["snapshotShown"] for s in live), live[-1:]
    assert all("Error displaying widget" not in s["outputs"] for s in seen if s), final
    # The bar moved while the job ran: some poll saw it strictly between empty and full before "completed", and
    # it never went back.
    running = [s["progress"] for s in live if job_status(s) not in FINAL_STATUSES]
    assert any(0 < p < 100 for p in running if p is not None), f"no intermediate progress seen: {running}"
    values = [p for p in running if p is not None] + [final["progress"]]
    assert values == sorted(values) and values[-1] == 100, values
    assert "$0.00 of $1.00" in live[-1]["text"], live[-1]
    # Then the final view, as a saved notebook keeps it: the job completed, its last line kept.
    assert not final["widget"] and "completed" in final["snapshotText"], final
    assert "remote done" in final["snapshotText"], final
    # The remote lines arrived in the cell's output, in order.
    lines = re.findall(r"^remote (line \d+|done)$", final["streams"], re.M)
    assert lines == [f"line {i}" for i in range(1, STEPS + 1)] + ["done"], final["streams"]
    errors = [s for s in seen if s and s.get("errors", "").strip()]
    assert not errors, errors[-1]
    assert "Today" in budget["text"], budget

    # The job left nothing behind (its kernel is still up; the fixture stops the server and it).
    wait_for(lambda: not local_job_dirs(burst_home) and not live_instances(burst_home), timeout=30,
             what="the local job to be cleaned up")
