"""Every notebook in notebooks/ runs headless with nbclient in a real ipykernel of this venv, twice (they must be
idempotent), in a copy of the folder with BURST_HOME in tmp, and leaves nothing behind: no cell error, text
beside every widget view, no job folder, no live state row, no open reservation, no file but ./data and ./out.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import nbformat
import pytest
from burst_checks import db_file, live_instances
from kernels import kernel_manager, local_job_dirs
from nbclient import NotebookClient

from burst_jupyter.budget import Budget

pytestmark = pytest.mark.kernel

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# What a notebook may leave beside itself (example inputs and results); everything else must be gone.
ALLOWED_LEFTOVERS = {"data", "out"}


def execute(path: Path, tmp: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    km = kernel_manager(tmp)
    client = NotebookClient(nb, km=km, timeout=120, allow_errors=False, shutdown_kernel="graceful",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        # Raises CellExecutionError, with the cell and its traceback, if any cell fails. cleanup_kc: shut the
        # kernel down gracefully at the end (nbclient leaves a kernel it was handed alive otherwise).
        client.execute(cleanup_kc=True)
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert not km.is_alive()
    return nb


def code_cells(nb: nbformat.NotebookNode) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code"]


def stream_text(cell: Any, name: str = "stdout") -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name)


def check_outputs(nb: nbformat.NotebookNode) -> None:
    for cell in code_cells(nb):
        for output in cell.outputs:
            assert output.output_type != "error", f"{cell.source!r} failed: {output.get('evalue')}"
            data = output.get("data", {})
            if output.output_type == "display_data" or WIDGET_VIEW in data:
                # A reader without widgets (nbconvert, GitHub, a terminal) still sees the job, as text.
                assert data.get("text/plain", "").strip(), f"no text/plain in a display of {cell.source!r}"
                assert data.get("text/html", "").strip(), f"no text/html in a display of {cell.source!r}"


def check_nothing_left(folder: Path, before: set[str], burst_home: Path) -> None:
    assert local_job_dirs(burst_home) == [], "a local job folder is left"
    assert live_instances(burst_home) == [], "a live state row is left"
    with Budget(db_file(burst_home)) as budget:
        assert budget.open_reservations() == []
    new = {p.name for p in folder.iterdir()} - before
    assert new <= ALLOWED_LEFTOVERS, f"the notebook left {sorted(new - ALLOWED_LEFTOVERS)} behind"


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_headless_and_leaves_nothing_behind(name: str, tmp_path: Path, burst_home: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    folder = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, folder, ignore=shutil.ignore_patterns(*ALLOWED_LEFTOVERS, ".ipynb_checkpoints",
                                                                     "*.out.ipynb", "__pycache__"))
    saved = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in code_cells(saved):
        assert cell.outputs == [] and cell.execution_count is None, "save notebooks with their outputs cleared"
    before = {p.name for p in folder.iterdir()}

    for _ in range(2):  # the second run proves the notebook is idempotent
        nb = execute(folder / name, tmp_path)
        check_outputs(nb)
        check_nothing_left(folder, before, burst_home)
        if name == "quickstart.ipynb":
            check_quickstart(nb, folder)


def check_quickstart(nb: nbformat.NotebookNode, folder: Path) -> None:
    cells = code_cells(nb)
    (burst_cell,) = [c for c in cells if c.source.startswith("%%burst") and "--pull loss" in c.source]
    # The remote cell's prints, streamed into the cell, in order.
    out = stream_text(burst_cell)
    steps = re.findall(r"^step (\d+): loss ", out, re.M)
    assert steps and steps == [str(i) for i in range(1, len(steps) + 1)], out
    final = re.search(r"^final loss (\S+)$", out, re.M)
    assert final is not None, out
    # The job view kept in the notebook says how the job ended, as text and HTML only: with the widget view, and
    # the widget state nbclient saves, nbconvert would draw a widget from a CDN, or nothing offline.
    (view,) = [o for o in burst_cell.outputs if o.output_type == "display_data"]
    assert "completed" in view.data["text/plain"] and WIDGET_VIEW not in view.data

    # `loss` came back into the notebook: the cell showing it displays the very value the remote cell printed.
    (loss_cell,) = [c for c in cells if c.source.rstrip().endswith("\nloss")]
    (shown,) = [o for o in loss_cell.outputs if o.output_type == "execute_result"]
    assert shown.data["text/plain"] == final.group(1)
    # And so did the file the remote cell wrote into out/.
    model = (folder / "out" / "model.txt").read_text()
    assert model.startswith("w = ") and model in stream_text(loss_cell)

    ledger_cell = next(c for c in cells if "burst.ledger()" in c.source)
    (table,) = [o for o in ledger_cell.outputs if o.output_type == "execute_result"]
    assert "completed" in table.data["text/plain"] and "<table" in table.data["text/html"]
    budget_cell = next(c for c in cells if "burst.budget_bars()" in c.source)
    (bars,) = [o for o in budget_cell.outputs if o.output_type == "execute_result"]
    assert "Today" in bars.data["text/plain"]

    (wait_cell,) = [c for c in cells if "job.wait()" in c.source]
    assert re.search(r"^\S+ completed ", stream_text(wait_cell), re.M), stream_text(wait_cell)
    # The background cell ran on after nbclient left it: its end, and what it printed, came to it all the same.
    (background,) = [c for c in cells if "--background" in c.source]
    assert [o.output_type for o in background.outputs] == ["display_data"]
    shown = background.outputs[0].data
    assert shown["text/plain"].startswith("burst job 'background' · completed · ")
    assert "\nworking 0\nworking 1\nworking 2\n" in shown["text/plain"] and WIDGET_VIEW not in shown

    # Exported to HTML, both job views show as they ended, and the background job's output with it.
    from nbconvert import HTMLExporter

    page, _ = HTMLExporter().from_notebook_node(nb)
    body = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert body.count('<div class="burst-job">') == 2
    assert body.count('<td style="text-align:left">completed</td>') == 2
    assert "working 0\nworking 1\nworking 2\n" in body
