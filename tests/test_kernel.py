"""%%burst in real ipykernels (jupyter_client, this venv's interpreter, BURST_HOME per test): what reaches IOPub
and in which order, which cell background output lands in, and what happens to a running job when its kernel
goes away (graceful shutdown, SIGTERM, SIGKILL and the next kernel's reconciliation at load).

Jobs run on the real ``local`` provider. Where a test needs the remote cell to be at a known point it waits on a
gate file the test creates, so ordering is proven by cause and effect, never by timing.
"""

from __future__ import annotations

import base64
import re
import signal
import sys
import venv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from burst_checks import db_file
from kernels import (
    Execution,
    Kernel,
    leftovers,
    local_job_dirs,
    wait_until_clean,
    writer_cell,
)
from kernels import start_writer as start_writing

from burst_jupyter.budget import Budget

pytestmark = pytest.mark.kernel

LOCAL = "%%burst --provider local --max-cost 1"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# Wait in the remote cell until the test creates the file named by the pushed variable `gate` (bounded, so a
# failed test never leaves a cell waiting for ever).
WAIT_FOR_GATE = """\
_deadline = time.time() + 30
while not os.path.exists(gate):
    if time.time() > _deadline:
        raise TimeoutError("the test never opened the gate")
    time.sleep(0.02)
"""





def merged(streams: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Neighbouring chunks of one stream joined: IOPub may split a line, never reorder."""
    out: list[tuple[str, str]] = []
    for name, text in streams:
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + text)
        else:
            out.append((name, text))
    return out


def progress_updates(execution: Execution, value: float) -> list[dict[str, object]]:
    return [m for m in execution.of_type("comm_msg")
            if m["content"]["data"].get("method") == "update"
            and m["content"]["data"].get("state", {}).get("value") == value]


# -- IOPub while a blocking %%burst runs ------------------------------------------------------------------------


def test_blocking_output_and_widget_updates_stream_before_the_reply(start_kernel: Callable[[], Kernel],
                                                                     tmp_path: Path) -> None:
    kernel = start_kernel()
    assert kernel.run_ok("import sys; print(sys.executable)").text() == sys.executable + "\n"
    gate = tmp_path / "gate"
    kernel.run_ok(f"gate = {str(gate)!r}")
    cell = kernel.submit(f"""{LOCAL} --push gate
import os, sys, time
print("line 0")
burst.progress(50)
{WAIT_FOR_GATE}
print("line 1")
print("warn 2", file=sys.stderr)
print("line 3")
""")
    # The remote cell is now blocked on the gate, so whatever arrives here was streamed while it ran.
    kernel.pump_until(lambda: "line 0\n" in cell.text("stdout"), timeout=30, what="the first remote line")
    kernel.pump_until(lambda: progress_updates(cell, 50.0), timeout=30, what="the progress bar at 50%")
    assert cell.reply is None, "the cell replied while its remote cell was still waiting"
    assert cell.of_type("display_data"), "the job view is displayed as soon as the job starts"
    gate.touch()
    kernel.finish(cell)

    assert cell.status == "ok"
    assert merged(cell.streams()) == [("stdout", "line 0\nline 1\n"), ("stderr", "warn 2\n"), ("stdout", "line 3\n")]
    # Nothing of this cell arrives after it went idle.
    kinds = [m["msg_type"] for m in cell.iopub]
    idle = kinds.index("status", kinds.index("execute_input"))
    assert [k for k in kinds[idle + 1:] if k in ("stream", "comm_msg", "display_data", "update_display_data")] == []
    # The view ends showing success (the final state is sent before the reply).
    assert any(m["content"]["data"].get("state", {}).get("bar_style") == "success" for m in cell.of_type("comm_msg"))


# -- background output goes to the cell that started the job ---------------------------------------------------


def test_background_output_keeps_the_parent_header_of_its_cell(start_kernel: Callable[[], Kernel],
                                                                tmp_path: Path) -> None:
    kernel = start_kernel()
    gate = tmp_path / "gate"
    kernel.run_ok(f"gate = {str(gate)!r}")
    first = kernel.run_ok(f"""{LOCAL} --background --push gate
import os, time
print("bg 0")
{WAIT_FOR_GATE}
for i in range(1, 4):
    print(f"bg {{i}}")
    time.sleep(0.2)
""")
    assert first.of_type("execute_result") == []  # the job shows as its view, not a repr frozen at "queued"
    kernel.pump_until(lambda: "bg 0\n" in first.text(), timeout=30, what="the background job's first line")
    second = kernel.run_ok("job = _")
    # The rest of the output is printed while this later cell is the one running.
    third = kernel.run_ok(f"open({str(gate)!r}, 'w').close()\nprint('cell 3:', job.wait(timeout=60).status)")
    kernel.pump_until(lambda: "bg 3\n" in first.text(), timeout=30, what="the background job's last line")

    assert first.text("stdout") == "bg 0\nbg 1\nbg 2\nbg 3\n"
    assert third.text() == "cell 3: completed\n"
    assert second.streams() == []
    strays = [m for m in kernel.all_iopub if m["msg_type"] == "stream" and "bg " in m["content"]["text"]
              and m["parent_header"].get("msg_id") != first.msg_id]
    assert strays == [], "background output went to another cell"


def test_background_error_shows_its_traceback_in_its_cell(start_kernel: Callable[[], Kernel]) -> None:
    kernel = start_kernel()
    first = kernel.run_ok(f"""{LOCAL} --background
def train():
    raise ValueError("boom in the background")
train()
""")
    second = kernel.run_ok("print('wait:', _.wait(timeout=60).status)")
    kernel.pump_until(lambda: "boom in the background" in first.text("stderr"), timeout=30,
                      what="the remote traceback in the starting cell")
    assert "ValueError" in first.text("stderr") and "train()" in first.text("stderr")
    assert second.text() == "wait: failed\n"


def test_notebook_functions_and_classes_travel_both_ways(start_kernel: Callable[[], Kernel]) -> None:
    """In a kernel the notebook *is* __main__: plain pickle would send `f` as a reference "__main__.f" that the
    instance cannot resolve. They must travel by value, and so must what the cell defines."""
    kernel = start_kernel()
    kernel.run_ok("def f(x):\n    return x + 1\nclass P:\n    def __init__(self):\n        self.v = 3\np = P()")
    kernel.run_ok(f"{LOCAL} --push f,p --pull y,g,Q\ny = f(p.v)\ndef g():\n    return 5\nclass Q:\n    pass\n")
    shown = kernel.run_ok("print(y, g(), Q.__name__)")
    assert shown.text("stdout") == "4 5 Q\n"


# -- what the remote cell displays -----------------------------------------------------------------------------


def shown_in_order(execution: Execution) -> list[tuple[str, Any]]:
    """The cell's stdout (joined while it runs on) and displays, in IOPub order. Left out: the job's view, and
    stderr, where burst adds notes of its own when a machine is slow (these cells write none)."""
    out: list[tuple[str, Any]] = []
    for m in execution.iopub:
        kind, content = m["msg_type"], m["content"]
        if kind == "stream" and content["name"] == "stdout" and out and out[-1][0] == "stdout":
            out[-1] = ("stdout", out[-1][1] + content["text"])
        elif kind == "stream" and content["name"] == "stdout":
            out.append(("stdout", content["text"]))
        elif kind in ("display_data", "execute_result") and WIDGET_VIEW not in content["data"]:
            out.append((kind, content["data"]))
    return out


def test_displays_plots_and_tables_arrive_as_local_ones_do_in_order(start_kernel: Callable[[], Kernel]) -> None:
    kernel = start_kernel()
    cell = kernel.run_ok(f"""{LOCAL}
%matplotlib inline
from IPython.display import HTML, JSON, Markdown, display
import matplotlib.pyplot as plt
import pandas as pd
print("before")
display(HTML("<b>bold</b>"), Markdown("# Title <script>alert(1)</script>"))
plt.plot([1, 2, 3])
plt.show()
print("between")
display(JSON({{"a": [1, 2]}}))
plt.figure()
plt.plot([3, 2])
pd.DataFrame({{"a": [1, 2]}})
""", timeout=120)
    shown = shown_in_order(cell)
    kinds = [(kind, sorted(set(data) - {"text/plain"}) if isinstance(data, dict) else data) for kind, data in shown]
    assert kinds == [
        ("stdout", "before\n"),
        ("display_data", ["text/html"]),
        ("display_data", ["text/markdown"]),
        ("display_data", ["image/png"]),  # plt.show(), where it was called
        ("stdout", "between\n"),
        ("display_data", ["application/json"]),
        ("display_data", ["image/png"]),  # the figure left open, at the cell's end
        ("execute_result", ["text/html"]),  # the DataFrame, as its table
    ], kinds
    html, markdown, figure = shown[1][1], shown[2][1], shown[3][1]
    assert html["text/html"].startswith('<iframe sandbox="" srcdoc="') and "&lt;b&gt;bold" in html["text/html"]
    assert markdown["text/markdown"].startswith("# Title &lt;script>")  # shown as the text it says, never run
    assert base64.b64decode(figure["image/png"]).startswith(b"\x89PNG") and figure["text/plain"].startswith("<Figure")
    assert shown[5][1]["application/json"] == {"a": [1, 2]}
    table = shown[7][1]
    assert "dataframe" in table["text/html"] and table["text/plain"] == "   a\n0  1\n1  2"




def test_a_background_cells_displays_reach_that_cell(start_kernel: Callable[[], Kernel]) -> None:
    kernel = start_kernel()
    first = kernel.run_ok(f"{LOCAL} --background\nprint('bg')\ndisplay({{'shown': 1}})\n")
    later = kernel.run_ok("print('cell 2:', _.wait(timeout=60).status)")
    kernel.pump_until(lambda: len(shown_in_order(first)) == 2, timeout=30, what="the background job's display")
    assert shown_in_order(first) == [("stdout", "bg\n"), ("display_data", {"text/plain": "{'shown': 1}"})]
    assert later.text() == "cell 2: completed\n" and shown_in_order(later) == [("stdout", "cell 2: completed\n")]


def test_a_tqdm_auto_bar_ends_showing_its_final_state(start_kernel: Callable[[], Kernel]) -> None:
    """tqdm.auto on the instance draws a text bar (no widget can reach the notebook): redrawn with carriage
    returns, which the notebook folds into one line, and ending complete."""
    kernel = start_kernel()
    cell = kernel.run_ok(f"{LOCAL}\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(50)):\n    pass\nprint('done')\n")
    assert cell.text("stdout") == "done\n"
    draws = re.findall(r"[^\r\n]*\d+/50[^\r\n]*[\r\n]?", cell.text("stderr"))  # burst's own notes left out
    assert draws and draws[-1].startswith("100%|") and " 50/50 " in draws[-1] and draws[-1].endswith("\n"), draws


def test_a_python_without_ipython_or_matplotlib_shows_text(start_kernel: Callable[[], Kernel], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # the standard library only
    kernel = start_kernel()
    cell = kernel.run_ok(f"""{LOCAL} --python {bare / "bin" / "python"}
for name in ("IPython", "matplotlib"):
    try:
        __import__(name)
    except ImportError:
        print("no", name)
display("shown", {{"a": 1}})
{{"b": 2}}
""", timeout=120)
    assert shown_in_order(cell) == [
        ("stdout", "no IPython\nno matplotlib\n"),
        ("display_data", {"text/plain": "'shown'"}),
        ("display_data", {"text/plain": "{'a': 1}"}),
        ("execute_result", {"text/plain": "{'b': 2}"}),
    ]


def test_a_background_cells_out_follows_the_job_to_its_end(start_kernel: Callable[[], Kernel]) -> None:
    """The cell's result is the job's view under a display id, not a repr frozen at "queued"; when the job ends the
    view is shown as it ended, to its own cell and (with the output, for nbclient and papermill, which only listen
    to the running cell) to the cell running then."""
    kernel = start_kernel()
    first = kernel.run_ok(f"""{LOCAL} --background --name bg
import time
for i in range(3):
    print("working", i)
    time.sleep(0.3)
""")
    (shown,) = first.of_type("display_data")
    display_id = shown["content"]["transient"]["display_id"]
    assert WIDGET_VIEW in shown["content"]["data"] and "burst job 'bg'" in shown["content"]["data"]["text/plain"]
    assert first.of_type("execute_result") == []
    second = kernel.run_ok("job = _\nprint(type(job).__name__, job.wait(timeout=60).status)")
    assert second.text() == "Job completed\n"

    def updates(execution: Execution) -> list[dict[str, Any]]:
        return [m["content"] for m in execution.of_type("update_display_data")
                if m["content"]["transient"]["display_id"] == display_id]

    kernel.pump_until(lambda: updates(first) and updates(second), timeout=30, what="the final view in both cells")
    own, now = updates(first)[-1]["data"], updates(second)[-1]["data"]
    for data in (own, now):
        assert set(data) == {"text/plain", "text/html"}  # as it ended: no widget a saved notebook cannot draw
        assert data["text/plain"].startswith("burst job 'bg' · completed")
    # The cell that saw the streams gets the view alone; the running cell's copy carries what the job printed.
    assert "working 0" not in own["text/plain"] and "working 0" not in own["text/html"]
    assert "working 0\nworking 1\nworking 2\n" in now["text/plain"]
    assert '<div class="mathjax_ignore tex2jax_ignore"><pre class="burst-output">working 0\n' in now["text/html"]


def test_ctrl_c_mid_job_says_what_became_of_it_in_one_line(start_kernel: Callable[[], Kernel], burst_home: Path,
                                                            work: Path) -> None:
    kernel = start_kernel()
    cell = kernel.submit(f"{LOCAL} --mount ./out:out:rw\n{writer_cell(150)}")
    kernel.pump_until(lambda: "wrote 2\n" in cell.text("stdout"), timeout=60, what="the job's first files")
    kernel.km.interrupt_kernel()
    kernel.finish(cell)

    assert cell.status == "error"
    (error,) = cell.of_type("error")
    (line,) = error["content"]["traceback"]  # one line, not the frames of burst the interrupt went through
    job_id = line.split()[2]
    written = cell.text("stdout").count("wrote ")
    assert line.startswith(f"burst: job {job_id} cancelled by Ctrl-C · synced back "), line
    assert f" · terminated local instance {job_id} · settled $0.00" in line, line
    assert int(line.split("synced back ")[1].split()[0]) >= written  # every file written, and the note
    check_settled(burst_home, job_id, message=None)
    check_synced(work, written)


# -- a kernel going away mid-job ---------------------------------------------------------------------------------


def start_writer(kernel: Kernel, burst_home: Path, *, background: bool) -> tuple[str, int]:
    """The file-writing job on this machine, ending by itself after ~15 s if nobody stops it."""
    return start_writing(kernel, burst_home, f"{LOCAL} --mount ./out:out:rw", steps=150, background=background)


def check_synced(work: Path, written: int) -> None:
    """Every file the cell reported before the kernel went away came back into the local rw folder, and so did
    the note the cell wrote when the stop reached it as KeyboardInterrupt."""
    for i in range(written):
        assert (work / "out" / f"f{i}.txt").read_text() == str(i)
    assert (work / "out" / "stopped.txt").read_text() == "KeyboardInterrupt"


def check_settled(burst_home: Path, job_id: str, *, message: str | None) -> None:
    found = wait_until_clean(burst_home, job_id)
    assert found.ledger is not None and found.ledger.status == "cancelled"
    if message is not None:
        assert message in (found.ledger.message or "")
    with Budget(db_file(burst_home)) as budget:
        assert budget.open_reservations() == []


@pytest.mark.parametrize("background", [True, False], ids=["background", "blocking"])
def test_graceful_shutdown_mid_job_syncs_back_and_ends_the_job(start_kernel: Callable[[], Kernel], burst_home: Path,
                                                               work: Path, background: bool) -> None:
    kernel = start_kernel()
    job_id, written = start_writer(kernel, burst_home, background=background)
    # jupyter_client's graceful path: SIGINT, shutdown_request, SIGTERM after 2.5 s, SIGKILL after 5 s.
    kernel.km.shutdown_kernel(now=False)
    kernel.wait_dead()
    # A background job is the detached reaper's (the kernel's atexit hook hands it over); a blocking one is
    # cancelled in the cell by the SIGINT, or handed over by the SIGTERM if that were too slow.
    check_settled(burst_home, job_id, message="kernel exit; finished by the reaper" if background else None)
    check_synced(work, written)


@pytest.mark.parametrize("background", [True, False], ids=["background", "blocking"])
def test_sigterm_mid_job_hands_the_job_to_the_reaper(start_kernel: Callable[[], Kernel], burst_home: Path,
                                                     work: Path, background: bool) -> None:
    kernel = start_kernel()
    job_id, written = start_writer(kernel, burst_home, background=background)
    kernel.km.signal_kernel(signal.SIGTERM)
    kernel.wait_dead()
    check_settled(burst_home, job_id, message="signal SIGTERM; finished by the reaper")
    check_synced(work, written)


def test_sigkill_leftover_is_reported_by_the_next_kernel_and_cleaned_up(start_kernel: Callable[[], Kernel],
                                                                         burst_home: Path, work: Path) -> None:
    kernel = start_kernel()
    job_id, written = start_writer(kernel, burst_home, background=False)
    kernel.km.signal_kernel(signal.SIGKILL)
    kernel.wait_dead()
    # Nothing ran in the dead kernel: the job is still there, running, owned by nobody.
    found = leftovers(burst_home, job_id)
    assert found.state == "launched" and local_job_dirs(burst_home) == [burst_home / "local" / job_id]
    assert found.processes and found.ledger is None

    successor = start_kernel()  # %load_ext burst_jupyter: reports the leftover, reconciles in the background
    report = successor.all_iopub
    loaded = "".join(m["content"]["text"] for m in report if m["msg_type"] == "stream")
    assert job_id in loaded and "left by a kernel that is gone" in loaded and "%burst cleanup" in loaded

    cleanup = successor.run_ok("%burst cleanup")  # after the load-time pass, and saying first what that one did
    told = cleanup.text("stdout")
    assert "burst: reconciled at load: ended 1 of 1" in told and job_id in told
    (result,) = cleanup.of_type("execute_result")
    assert "burst cleanup: nothing to end" in result["content"]["data"]["text/plain"]
    check_settled(burst_home, job_id, message="reconciled at load; finished by the reaper")
    check_synced(work, written)
    (nothing,) = successor.run_ok("%burst cleanup --dry-run").of_type("execute_result")
    assert "nothing to end" in nothing["content"]["data"]["text/plain"]
