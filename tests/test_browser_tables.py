"""Money views in a real JupyterLab: their ``$`` amounts show literally, never typeset as LaTeX.

JupyterLab runs MathJax over every HTML output, and text between two ``$`` becomes math: ``%burst providers``
read "lowest RTX_3090 = $0.19/hr (1 offers), lowest RTX_4090 = " as a formula. One notebook shows
``%burst providers`` (the three marketplace fakes), ``burst.ledger()`` (rows at a Vast rate of $0.347/h and a job
still holding money), the budget bars, and the HTML snapshots of the bars and the offer browser (what a front end
without widgets, or an exported notebook, shows). A last cell holds real math, ``$x^2$``: once MathJax has
typeset it, MathJax is known to run, and no other cell may hold a MathJax element. In JupyterLab and Notebook 7;
screenshots of the ledger and the bars are saved in tmp (the paths are printed), JupyterLab's are the README's.

The server and the browser come from tests/jupyter_servers.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import nbformat
import pytest
from burst_checks import db_file
from jupyter_servers import App, Server, chromium, jupyter_server, open_notebook, poll, run_all_cells
from marketplaces import Markets

from burst_jupyter.budget import Budget

pytestmark = pytest.mark.browser

NOTEBOOK = "money.ipynb"
CELLS = [
    "%load_ext burst_jupyter\nimport burst_jupyter as burst\nfrom IPython.display import HTML, display",
    "%burst providers",
    "burst.ledger()",
    "burst.budget_bars()",
    'display(burst.budget_bars(), include=["text/html", "text/plain"])',
    'display(burst.offers(gpu="RTX_4090", provider="vast"), include=["text/html", "text/plain"])',
    'HTML("<p class=\'control\'>MathJax runs here: $x^2$</p>")',
]
PROVIDERS, LEDGER, BARS, BARS_HTML, OFFERS_HTML, CONTROL = range(1, len(CELLS))

# Each cell's output as text, and how many MathJax elements it holds (MathJax 3 draws mjx-container; 2 used
# .MathJax and script[type^=math/tex]).
OUTPUTS_JS = """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')].map(cell => {
    const area = cell.querySelector('.jp-OutputArea');
    return {
        text: area ? area.innerText : '',
        math: cell.querySelectorAll('mjx-container, .MathJax, .MathJax_Display, script[type^="math/tex"]').length,
        widget: !!cell.querySelector('.jp-OutputArea .jupyter-widgets.widget-vbox'),
    };
})"""

NOW = dt.datetime.now(dt.timezone.utc)


def seed(home: Path) -> None:
    """Two settled Vast jobs at $0.347/h and one still holding $2.00, against a $20 daily cap."""
    with Budget(db_file(home)) as budget:
        budget.set_cap("day", Decimal(20))
        budget.set_cap("week", Decimal(100))
        for i, (minutes, cost) in enumerate(((42, "0.2429"), (95, "0.5494"))):
            job = f"train-{i}a1b2c3d"
            started = NOW - dt.timedelta(minutes=minutes + 10 * i)
            budget.reserve(job_id=job, name=f"train {i}", provider="vast", gpu="RTX_4090", amount=Decimal(5),
                           now=started)
            budget.settle(job, provider="vast", instance_id=f"78356{i}", gpu="RTX_4090",
                          rate_usd_per_hour=Decimal("0.347"), started_at=started,
                          ended_at=started + dt.timedelta(minutes=minutes), actual_usd=Decimal(cost),
                          status="completed", name=f"train {i}", now=started)
        budget.reserve(job_id="sweep-9f8e7d6c", name="sweep", provider="runpod", gpu="RTX_4090", amount=Decimal(2))


def write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nbformat.write(nb, path)


@pytest.fixture(params=["lab", "notebook"])
def server(request: pytest.FixtureRequest, tmp_path: Path, burst_home: Path, markets: Markets) -> Iterator[Server]:
    app: App = request.param
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / NOTEBOOK)
    seed(burst_home)
    with jupyter_server(tmp_path, burst_home, root, app) as started:  # the kernel inherits the fakes' keys and URLs
        yield started


def test_money_views_show_dollars_literally(server: Server, tmp_path: Path) -> None:
    shots = {name: tmp_path / f"{name}.png" for name in ("notebook", "ledger", "budget-bars")}
    with chromium(server, width=1400, height=1400) as (page, js_errors):
        open_notebook(page, server, NOTEBOOK, cells=len(CELLS))
        # Notebook 7 logs "Cannot read properties of undefined (reading 'schema')" while it starts, before any cell
        # ran (2026-12-06): the front end's own, so only what comes after counts.
        startup = len(js_errors)
        if server.app == "lab":  # the file browser closed: the ledger's width fits the pictures
            page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
        run_all_cells(page)
        outputs = poll(page, OUTPUTS_JS, lambda cells: cells[CONTROL]["math"] > 0
                       and all(cell["text"].strip() or cell["widget"] for cell in cells[1:]),
                       timeout=90, what="every cell's output, and MathJax to typeset the control cell")
        page.wait_for_timeout(300)  # let the last layout settle before the pictures; nothing is asserted on it
        cells = page.locator(".jp-Notebook .jp-CodeCell .jp-OutputArea")
        cells.nth(LEDGER).locator("table.burst-ledger").screenshot(path=str(shots["ledger"]))
        cells.nth(BARS).screenshot(path=str(shots["budget-bars"]))
        page.screenshot(path=str(shots["notebook"]), full_page=True)
        outputs = page.evaluate(OUTPUTS_JS)  # after the pause: MathJax had every chance to act
    for name, path in shots.items():
        print(f"screenshot of the {name}: {path}")
    assert not js_errors[startup:], js_errors

    assert [cell["math"] for cell in outputs[1:CONTROL]] == [0] * (CONTROL - 1), outputs
    providers, ledger, bars, bars_html, offers_html = (outputs[i]["text"] for i in range(1, CONTROL))
    assert "lowest RTX_4090 = $0.298/hr" in providers and "lowest RTX_3090 = $0.19/hr" in providers, providers
    assert "$0.347" in ledger and "$0.79" in ledger and "reserved now" in ledger and "$2.00" in ledger, ledger
    assert outputs[BARS]["widget"] and "Today: $0.79 + $2.00 reserved / $20.00" in bars, bars
    assert "Today: $0.79 + $2.00 reserved / $20.00" in bars_html, bars_html
    assert "$0.352" in offers_html and "$0.298" in offers_html, offers_html
