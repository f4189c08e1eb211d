"""A real Jupyter front end in a real browser: this venv's JupyterLab or Notebook 7 on loopback, and Debian's
headless chromium driven by playwright. Shared by every browser test (tests/test_browser*.py).

``jupyter_server(tmp_path, burst_home, root, app="lab")`` starts the server with every Jupyter, IPython and home
folder in tmp and a python3 kernelspec for this interpreter, and stops it (and its kernels) at the end.
``chromium(server)`` opens the browser; ``poll`` waits on a script's result in the page without asserting a
duration. Needs /usr/bin/chromium, jupyterlab, notebook and playwright: a test fails without them (``./dev
test`` installs chromium), so a green run never hides a skipped browser. Never run ``playwright install``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from kernels import kernel_specs, wait_for

CHROMIUM = Path("/usr/bin/chromium")
# Chromium's own calls home are refused on a closed network (and slow its start); the sandbox needs a non-root
# user. The rest are the flags a clean headless profile wants.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]

App = Literal["lab", "notebook"]


def missing_requirement() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    for module in ("jupyterlab", "notebook", "playwright"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[dev]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    token: str
    app: App
    process: subprocess.Popen[bytes]
    log: Path
    home: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def notebook_url(self, name: str) -> str:
        """Where the front end opens notebook ``name`` (relative to the server's root)."""
        path = "lab/tree" if self.app == "lab" else "notebooks"
        return f"{self.url}/{path}/{name}?token={self.token}"


@contextlib.contextmanager
def jupyter_server(tmp_path: Path, burst_home: Path, root: Path, app: App = "lab") -> Iterator[Server]:
    reason = missing_requirement()
    if reason:
        pytest.fail(reason)
    config, data, runtime = (tmp_path / "jupyter" / name for name in ("config", "data", "runtime"))
    kernel_specs(data)  # data/kernels/python3 -> sys.executable; JUPYTER_DATA_DIR comes first in the search
    # No "would you like news?" toast over the notebook (it also fetches from the network).
    (config / "labconfig").mkdir(parents=True, exist_ok=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # Only what the notebook needs: no language-server scan (it runs `npm prefix --global`), no terminals.
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"jupyter_lsp": False, "jupyter_server_terminals": False}}}))
    home = tmp_path / "home"  # whatever the server, its kernel or chromium keep in ~ stays in tmp
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "BURST_HOME": str(burst_home), "IPYTHONDIR": str(tmp_path / "ipython"),
           "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(data), "JUPYTER_RUNTIME_DIR": str(runtime),
           "JUPYTER_PLATFORM_DIRS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    env.pop("JUPYTER_PATH", None)
    port, token = free_port(), secrets.token_hex(16)
    log = tmp_path / f"{app}.log"
    module = "jupyterlab" if app == "lab" else "notebook"
    argv = [sys.executable, "-m", module, "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if app == "lab":
        argv.append("--LabApp.expose_app_in_browser=True")
    else:
        argv.append("--JupyterNotebookApp.expose_app_in_browser=True")
    if os.geteuid() == 0:
        argv.append("--allow-root")  # CI containers run as root; the server refuses to otherwise
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = Server(url=f"http://127.0.0.1:{port}", token=token, app=app, process=process, log=log, home=home)
    try:
        def up() -> bool:
            assert process.poll() is None, f"jupyter {app} exited with {process.returncode}:\n{server.log_text()}"
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{server.url}/api/status", headers={"Authorization": f"token {token}"}, timeout=2)
                return r.status_code == 200
            return False

        wait_for(up, timeout=60, what=f"jupyter {app} to answer", interval=0.2)
        yield server
    finally:
        process.terminate()  # SIGTERM: the server shuts its kernels down, which ends their jobs
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def chromium(server: Server, *, width: int = 1200, height: int = 1000) -> Iterator[tuple[Any, list[str]]]:
    """A page in Debian's headless chromium, and the list its uncaught exceptions and console errors land in (a
    widget manager that cannot find or render a model logs one). A failed resource load is only the built-in LSP
    client asking a server without jupyter_lsp, and is left out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     env={**os.environ, "HOME": str(server.home)})
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            yield page, errors
        finally:
            browser.close()


def write_notebook(path: Path, *cells: str) -> None:
    """A notebook of these code cells for the ``python3`` kernel (this interpreter, see ``jupyter_server``)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)


# The open notebook and its kernel are ready (not "starting", "unknown" or "busy"), in JupyterLab and Notebook 7
# alike (both expose their application as window.jupyterapp with expose_app_in_browser).
KERNEL_IDLE_JS = """(cells) => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!kernel && kernel.status === 'idle' && !!w.content && w.content.widgets.length === cells;
}"""


def open_notebook(page: Any, server: Server, name: str, cells: int, *, timeout: float = 60) -> None:
    """Open notebook ``name`` and wait until its kernel is idle and its ``cells`` cells are shown."""
    page.goto(server.notebook_url(name))
    page.wait_for_function(KERNEL_IDLE_JS, arg=cells, timeout=timeout * 1000)


def run_all_cells(page: Any) -> None:
    """Start every cell. Not awaited: the command's promise settles only once every cell has run, and a test
    watches the cells while they run."""
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def poll(page: Any, script: str, predicate: Callable[[Any], Any], *, timeout: float, what: str,
         seen: list[Any] | None = None) -> Any:
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
