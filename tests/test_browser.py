"""The widgets in a real browser: JupyterLab (this venv's) in Debian's headless chromium, driven by playwright.

One notebook runs all its cells: a ``%%burst`` cell on the local provider that reports progress in five slow
steps, then ``burst.budget_bars()``. The DOM must show the JobView as a live widget (not its text/html or
text/plain snapshot), its progress bar at an intermediate value before the final one, the status "completed" at
the end, the remote lines in the cell's output in order, and the BudgetBars widget. Every wait polls the DOM
with a generous deadline; nothing asserts a duration. A screenshot of the finished notebook is saved in tmp.

Needs /usr/bin/chromium (Debian's chromium), jupyterlab and playwright; fails without any of them (`./dev test`
installs chromium: a green run never hides a skipped browser). Never run ``playwright install``: its browser
download is not needed, the test drives Debian's chromium.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from burst_checks import live_instances
from kernels import kernel_specs, local_job_dirs, wait_for

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "browser.ipynb"
STEPS = 5
FINAL_STATUSES = {"completed", "failed", "budget killed", "cancelled"}
# Chromium's own calls home are refused on a closed network (and slow its start); the sandbox needs a non-root
# user. The rest are the flags a clean headless profile wants.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]

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
    if (!root) return {widget: false, outputs: shown, streams};
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
        errors: [...cell.querySelectorAll('.jp-OutputArea-output[data-mime-type$="stderr"]')]
            .map(e => e.innerText).join(''),
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


def missing_requirement() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    for module in ("jupyterlab", "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[dev]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext burst_jupyter\nimport burst_jupyter as burst"),
        nbformat.v4.new_code_cell(BURST_CELL),
        nbformat.v4.new_code_cell("burst.budget_bars()"),
    ]
    nbformat.write(nb, path)


@dataclass
class Lab:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path
    home: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture
def lab(tmp_path: Path, burst_home: Path) -> Iterator[Lab]:
    """This venv's JupyterLab on a free loopback port, with a token, every Jupyter and IPython folder in tmp and
    a python3 kernelspec for this interpreter; stopped (and its kernels with it) at the end."""
    reason = missing_requirement()
    if reason:
        pytest.fail(reason)
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / NOTEBOOK)
    config, data, runtime = (tmp_path / "jupyter" / name for name in ("config", "data", "runtime"))
    kernel_specs(data)  # data/kernels/python3 -> sys.executable; JUPYTER_DATA_DIR comes first in the search
    # No "would you like news?" toast over the notebook (it also fetches from the network).
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # Only what the notebook needs: no language-server scan (it runs `npm prefix --global`), no terminals.
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"jupyter_lsp": False, "jupyter_server_terminals": False}}}))
    home = tmp_path / "home"  # whatever the server, its kernel or chromium keep in ~ stays in tmp
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "BURST_HOME": str(burst_home), "IPYTHONDIR": str(tmp_path / "ipython"),
           "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(data), "JUPYTER_RUNTIME_DIR": str(runtime),
           "JUPYTER_PLATFORM_DIRS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    env.pop("JUPYTER_PATH", None)
    port, token = free_port(), secrets.token_hex(16)
    log = tmp_path / "lab.log"
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        argv.append("--allow-root")  # CI containers run as root; the server refuses to otherwise
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = Lab(url=f"http://127.0.0.1:{port}", token=token, process=process, log=log, home=home)
    try:
        def up() -> bool:
            assert process.poll() is None, f"jupyter lab exited with {process.returncode}:\n{server.log_text()}"
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{server.url}/api/status", headers={"Authorization": f"token {token}"}, timeout=2)
                return r.status_code == 200
            return False

        wait_for(up, timeout=60, what="jupyter lab to answer", interval=0.2)
        yield server
    finally:
        process.terminate()  # SIGTERM: the server shuts its kernels down, which ends their jobs
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def poll(page: Any, script: str, predicate: Any, *, timeout: float, what: str, seen: list[Any] | None = None) -> Any:
    """Evaluate ``script`` in the page until ``predicate`` holds for its result; keep every result in ``seen``."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = page.evaluate(script)
        if seen is not None:
            seen.append(last)
        if predicate(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {last!r}")
        page.wait_for_timeout(50)


def test_widgets_render_and_update_live_in_jupyterlab(lab: Lab, tmp_path: Path, burst_home: Path) -> None:
    from playwright.sync_api import sync_playwright

    screenshot, running_shot = tmp_path / "browser-notebook.png", tmp_path / "browser-running.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     env={**os.environ, "HOME": str(lab.home)})
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            # Uncaught exceptions and console errors (a widget manager that cannot find or render a model logs
            # one); a failed resource load is only the built-in LSP client asking a server without jupyter_lsp.
            js_errors: list[str] = []
            page.on("pageerror", lambda e: js_errors.append(f"uncaught: {e}"))
            page.on("console", lambda m: js_errors.append(f"console: {m.text}") if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}")
            # The notebook is open and its kernel is up (not "starting", "unknown" or "busy").
            page.wait_for_function(
                """() => {
                    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                    const kernel = w && w.sessionContext && w.sessionContext.session
                        && w.sessionContext.session.kernel;
                    return !!kernel && kernel.status === 'idle' && !!w.content && w.content.widgets.length === 3;
                }""",
                timeout=60_000,
            )
            # Not awaited: the command's promise settles only once every cell has run, and the test must watch
            # the cells while they run.
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

            seen: list[Any] = []
            # Mid-run: a bar between empty and full (or the end, if that was missed; asserted below).
            mid = poll(page, JOB_VIEW_JS, lambda s: s and s.get("widget") and (
                0 < (s["progress"] or 0) < 100 or job_status(s) in FINAL_STATUSES), timeout=60,
                what="the JobView's progress to move", seen=seen)
            if job_status(mid) not in FINAL_STATUSES:
                page.screenshot(path=str(running_shot), full_page=True)
                print(f"screenshot mid-run: {running_shot}")
            ended = poll(page, JOB_VIEW_JS, lambda s: s and s.get("widget") and job_status(s) in FINAL_STATUSES,
                         timeout=60, what="the JobView to show the job's end", seen=seen)
            assert job_status(ended) == "completed", ended
            final = poll(page, JOB_VIEW_JS, lambda s: "remote done" in s["streams"] and s["progress"] == 100,
                         timeout=30, what="the remote output and a full bar")
            budget = poll(page, BUDGET_JS, lambda s: s and s["bars"] == 2 and "week" in s["text"], timeout=30,
                          what="the BudgetBars widget")
            page.wait_for_timeout(300)  # let the last layout settle before the picture; nothing is asserted on it
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot of the finished notebook: {screenshot}")
    assert not js_errors, js_errors

    # The JobView is a live widget, not its fallback: ipywidgets rendered it, and no text/html snapshot shows.
    assert final["widget"] and final["bars"] == 2 and not final["snapshotShown"], final
    assert "Error displaying widget" not in final["outputs"], final
    # The bar moved while the job ran: some poll saw it strictly between empty and full before "completed", and
    # it never went back.
    running = [s["progress"] for s in seen if s and s.get("widget") and job_status(s) not in FINAL_STATUSES]
    assert any(0 < p < 100 for p in running if p is not None), f"no intermediate progress seen: {running}"
    values = [p for p in running if p is not None] + [final["progress"]]
    assert values == sorted(values), values
    assert "success" in final["barClass"], final
    assert "$0.00 of $1.00" in final["text"], final
    # The remote lines arrived in the cell's output, in order, and the widget kept the last one.
    lines = re.findall(r"^remote (line \d+|done)$", final["streams"], re.M)
    assert lines == [f"line {i}" for i in range(1, STEPS + 1)] + ["done"], final["streams"]
    assert "remote done" in final["text"], final
    assert not final["errors"].strip(), final["errors"]
    assert "Today" in budget["text"], budget

    # The job left nothing behind (its kernel is still up; the fixture stops the server and it).
    wait_for(lambda: not local_job_dirs(burst_home) and not live_instances(burst_home), timeout=30,
             what="the local job to be cleaned up")
