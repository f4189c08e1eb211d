"""The job view in JupyterLab (Debian's headless chromium through playwright): what a user reads while a job runs
and after it ended.

One notebook runs all its cells: a blocking ``%%burst`` cell whose lines reach the view in pieces ("working", then
" 2\\n"), a ``--background`` cell, and a cell that waits for it. While the first job runs, every "last line" the
page shows is a whole line, the phase is in words, and what happens if the notebook dies is one line whose detail
is one click away (and on hover). The background cell shows the job's view rather than ``<Job … queued>``, and
follows it to "completed". At the end each view is its final snapshot (what a saved notebook keeps). Screenshots
go to pytest's tmp (their paths are printed); docs/screenshots/job-view.png is one of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_servers import Server, chromium, jupyter_server, open_notebook, poll, run_all_cells, write_notebook

pytestmark = pytest.mark.browser

NOTEBOOK = "jobview.ipynb"
STEPS = 6

BLOCKING = f"""%%burst --provider local --max-cost 1 --name train
import sys, time

for step in range({STEPS}):
    sys.stdout.write("working"); sys.stdout.flush()  # a line in two writes, a moment apart
    time.sleep(0.3)
    sys.stdout.write(f" {{step}}\\n"); sys.stdout.flush()
    burst.progress(100 * (step + 1) / {STEPS})
    time.sleep(0.3)"""

BACKGROUND = """%%burst --provider local --max-cost 1 --name sweep --background
import time

for i in range(3):
    print("sweep", i)
    time.sleep(0.5)"""

WAIT = "job = _\nprint(job.id, job.wait().status)"

# What cell ``index`` shows of its job: the live widget (a VBox whose first line says "burst job") or the final
# snapshot (div.burst-job), and the cell's streams.
CELL_JS = """(index) => {
    const cell = document.querySelectorAll('.jp-Notebook .jp-CodeCell')[index];
    if (!cell) return null;
    const area = cell.querySelector('.jp-OutputArea');
    const out = {outputs: area ? area.innerText : '', widget: false, snapshot: false};
    out.streams = [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type$="stdout"]')]
        .map(e => e.innerText).join('');
    const root = [...cell.querySelectorAll('.jupyter-widgets.widget-vbox')]
        .find(box => box.innerText.includes('burst job'));
    if (root) {
        const htmls = [...root.children].filter(e => e.classList.contains('widget-html'));
        const details = root.querySelector('details');
        Object.assign(out, {
            widget: true,
            status: htmls[0] ? htmls[0].innerText : '',
            lastLine: htmls[1] ? htmls[1].innerText : '',
            guard: details ? details.querySelector('summary').innerText : null,
            guardTitle: details ? details.querySelector('summary').title : null,
            guardOpen: details ? details.open : null,
        });
    }
    const snap = cell.querySelector('.jp-OutputArea .burst-job');
    if (snap) {
        const rows = {};
        for (const tr of snap.querySelectorAll('tr')) rows[tr.cells[0].innerText] = tr.cells[1].innerText;
        Object.assign(out, {snapshot: true, rows});
    }
    return out;
}"""


@pytest.fixture
def lab(tmp_path: Path, burst_home: Path) -> Iterator[Server]:
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / NOTEBOOK, "%load_ext burst_jupyter\nimport burst_jupyter as burst", BLOCKING, BACKGROUND,
                   WAIT)
    with jupyter_server(tmp_path, burst_home, root) as server:
        yield server


def phase(seen: dict[str, Any]) -> str:
    """The phase in the widget's first line: "burst job 'train' · running · local · $0.00/h"."""
    parts = seen["status"].split(" · ")
    return parts[1] if len(parts) > 1 else ""


def test_the_job_view_reads_well_while_running_and_after(lab: Server, tmp_path: Path) -> None:
    running_shot, final_shot = tmp_path / "job-view-running.png", tmp_path / "job-view-final.png"
    cell_shot = tmp_path / "job-view.png"  # the running job's cell alone: docs/screenshots/job-view.png
    with chromium(lab, height=1100) as (page, js_errors):
        open_notebook(page, lab, NOTEBOOK, cells=4)
        run_all_cells(page)
        seen: list[Any] = []
        poll(page, f"() => ({CELL_JS})(1)", lambda s: s and s["widget"] and "working 2\n" in s["streams"],
             timeout=90, what="the blocking job's third line", seen=seen)
        page.locator(".jp-Notebook .jp-CodeCell").nth(1).locator("details summary").hover()
        page.wait_for_timeout(300)  # let the hover settle before the picture; nothing is asserted on it
        page.screenshot(path=str(running_shot), full_page=True)
        page.locator(".jp-Notebook .jp-CodeCell").nth(1).screenshot(path=str(cell_shot))
        print(f"screenshots mid-run: {running_shot} {cell_shot}")
        first = poll(page, f"() => ({CELL_JS})(1)", lambda s: s and s["snapshot"], timeout=90,
                     what="the blocking job's final view", seen=seen)
        background = poll(page, f"() => ({CELL_JS})(2)",
                          lambda s: s and (s["snapshot"] or (s["widget"] and phase(s) == "completed")),
                          timeout=90, what="the background job's view to say it completed")
        waited = poll(page, f"() => ({CELL_JS})(3)", lambda s: s and "completed" in s["streams"], timeout=60,
                      what="the waiting cell")
        page.wait_for_timeout(300)
        page.screenshot(path=str(final_shot), full_page=True)
        print(f"screenshot of the finished notebook: {final_shot}")
    assert not js_errors, js_errors

    live = [s for s in seen if s and s["widget"]]
    # Whole lines only: never "working" alone, nor the " 2" that completes it.
    lines = {s["lastLine"] for s in live} - {""}
    assert lines and all(re.fullmatch(r"working \d", line) for line in lines), lines
    # The phases in words, not event names.
    phases = {phase(s) for s in live}
    assert "running" in phases and not any("_" in p for p in phases), phases
    # What happens if the notebook dies: one short line, the layers on hover and one click away (closed).
    guard = {(s["guard"], s["guardTitle"], s["guardOpen"]) for s in live if s["guard"]}
    assert len(guard) == 1, guard
    ((line, title, opened),) = guard
    assert line.startswith("If this notebook dies, the job stops within ") and "\n" not in line, line
    assert "`" not in line + title and "job's own finally" in title and opened is False, guard
    # Once ended, each view is its final snapshot, as a saved or exported notebook keeps it.
    assert first["rows"]["Status"] == "completed" and "working 5" in first["rows"]["Last output"], first
    assert first["rows"]["Cost"].strip() == "$0.00 of $1.00", first  # as written, not typeset by MathJax
    assert "<Job" not in background["outputs"], background  # the Out is the job's view, not its repr at "queued"
    assert "sweep 2" in background["streams"], background
    assert re.search(r"sweep-\S+ completed", waited["streams"]), waited
