"""Issue 9, section 1: nothing an instance sends back runs code on the user's machine unless the user asked for it.

The machine is tampered with for real: a ``--python`` that runs the real agent shipped by the client, except that
just before the results are packed it plants a values file of its own in the job directory (what anyone with
root on a rented machine can do). A planted pickle, if the client ever unpickled it, creates a mark file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, last_job, ledger_rows, local_jobdirs, open_reservations, run_cell, tampered_agent

from burst_jupyter import agent
from burst_jupyter.attempt import Attempt
from burst_jupyter.errors import SyncError, VariableError
from burst_jupyter.job import JobStatus

# The real agent with ``_add_results`` wrapped to plant PLANT first.
PLANT_VALUES = """
real = ns["_add_results"]

def tampered(jobdir, tar):
    with open({plant!r}, "rb") as src, open(os.path.join(jobdir, "values.out.pkl"), "wb") as dst:
        dst.write(src.read())
    real(jobdir, tar)

ns["_add_results"] = tampered
"""


class _RunsCode:
    """Unpickling this runs ``touch MARK`` (and gives back ``then``): what a hostile pickle does."""

    def __init__(self, mark: Path, then: str = "{}") -> None:
        self.mark, self.then = mark, then

    def __reduce__(self) -> Any:
        return (eval, (f"__import__('os').system('touch {self.mark}') and 0 or {self.then}",))


def _hostile(tmp_path: Path, plant: bytes) -> Path:
    (tmp_path / "plant").write_bytes(plant)
    return tampered_agent(tmp_path / "hostile-python", PLANT_VALUES.format(plant=str(tmp_path / "plant")))


def _run(ip: Any, tmp_path: Path, python: Path, options: str, body: str) -> Any:
    (tmp_path / "out").mkdir(exist_ok=True)
    result, streams = run_cell(ip, cell(f"--provider local --rate 1 --python {python} --mount ./out:out:rw "
                                        f"--background {options}", body))
    assert result.error_in_exec is None, streams.text(ours=True)
    # A values file that breaks the teardown used to hang the job for ever: a limit turns that into a failure.
    return result.result.wait(timeout=60)


def _settled(burst_home: Path, job_id: str) -> None:
    """Synced, ended and billed: one ledger row, no reservation held, nothing left on the machine."""
    assert [row.job_id for row in ledger_rows(burst_home)] == [job_id]
    assert open_reservations(burst_home) == []
    assert local_jobdirs(burst_home) == []
    assert (Path("out") / "made.txt").read_text() == "synced"


CELL = """
    open("out/made.txt", "w").write("synced")
    x = 1
"""


def test_a_value_that_is_not_pulled_runs_nothing(ip: Any, tmp_path: Path, burst_home: Path) -> None:
    """``x = 1`` with no ``--pull`` on a tampered machine: whatever values file it sends is never unpickled."""
    mark = tmp_path / "pwned"
    python = _hostile(tmp_path, pickle.dumps(_RunsCode(mark)))
    done = _run(ip, tmp_path, python, "", CELL)
    assert not mark.exists(), "the instance ran code in the kernel"
    assert done.status is JobStatus.COMPLETED, done.error
    _settled(burst_home, done.job_id)


def test_the_last_expression_comes_back_as_what_the_notebook_shows(ip: Any, tmp_path: Path,
                                                                 burst_home: Path) -> None:
    """The cell's value is its repr and display data, never a pickle: a value whose pickle runs code runs none."""
    mark = tmp_path / "pwned"
    result, streams = run_cell(ip, cell("--provider local", f"""
        import os
        class Shown:
            def __reduce__(self):
                return (os.system, ("touch {mark}",))
            def __repr__(self):
                return "<shown \\x1b]52;c;Y2xpcA==\\x07value>"
            def _repr_html_(self):
                return "<b>bold</b><script>alert(1)</script>"
        Shown()
    """))
    assert result.error_in_exec is None, streams.text(ours=True)
    assert not mark.exists(), "the cell's value was unpickled in the kernel"
    shown = result.result
    assert repr(shown) == "<shown value>"  # terminal escapes stripped
    bundle = shown._repr_mimebundle_()
    assert bundle["text/plain"] == "<shown value>"
    # The HTML is shown, but in a sandboxed frame: its script never runs in the notebook.
    html = bundle["text/html"]
    assert html.startswith('<iframe sandbox="" srcdoc="') and "&lt;script&gt;" in html and "<script>" not in html



def test_what_a_cell_displays_reaches_the_notebook_inert_and_bounded() -> None:
    """A display record is the instance's data: only the allowed formats pass, each bounded, each inert."""
    (notice,) = Attempt().take({"k": agent.Kind.DISPLAY, "data": {
        "text/plain": "x\x1b]52;c;Y2xpcA==\x07y",
        "text/html": "<script>alert(1)</script>",
        "text/markdown": "<img src=x onerror=alert(1)> [a](JavaScript:alert(1)) ![b](data:text/html,x) &#60;b&#62;",
        "application/json": "not an object or a list",
        "application/javascript": "alert(1)",
        "image/svg+xml": "<svg onload=alert(1)>",
        "image/png": "not base64!",
        "image/jpeg": "A" * (600 * 1024),  # over the bound of one format
    }})
    data = notice.fields["data"]
    assert set(data) == {"text/plain", "text/html", "text/markdown"}
    assert data["text/plain"] == "xy"  # terminal escapes stripped
    assert data["text/html"].startswith('<iframe sandbox="" srcdoc="') and "<script>" not in data["text/html"]
    markdown = data["text/markdown"]
    assert "<" not in markdown and "&#60;" not in markdown  # no raw HTML, and no reference that spells it
    assert "javascript:" not in markdown.lower() and "data:" not in markdown
    big = {"application/json": {"a": ["x" * 1024] * 600}, "text/plain": "big"}
    assert "application/json" not in Attempt().take({"k": agent.Kind.DISPLAY, "data": big})[0].fields["data"]


def _burst_container(mark: Path) -> bytes:
    """A values file in burst's own container, with a name nobody asked for."""
    path = mark.parent / "container"
    agent.write_values(str(path), {"x": ("ok", pickle.dumps(42)), "y": ("ok", pickle.dumps(_RunsCode(mark)))})
    return path.read_bytes()


@pytest.mark.parametrize("plant", ["pickled table", "burst container"])
def test_names_not_asked_for_are_never_unpickled(ip: Any, tmp_path: Path, burst_home: Path, plant: str) -> None:
    mark = tmp_path / "pwned"
    if plant == "pickled table":  # today's format: the value and the result ride along with the asked name
        evil = pickle.dumps(_RunsCode(mark, "1"))
        blob = pickle.dumps({"x": ("ok", pickle.dumps(42)), "y": ("ok", evil), "__burst_result__": ("ok", evil)})
    else:
        blob = _burst_container(mark)
    python = _hostile(tmp_path, blob)
    done = _run(ip, tmp_path, python, "--pull x", CELL)
    assert not mark.exists(), "a name that was not asked for was unpickled"
    assert done.status is JobStatus.FAILED and isinstance(done.error, VariableError)
    assert "nothing was unpickled" in str(done.error) and "\n" not in str(done.error)
    assert "y" not in ip.user_ns and done.values == {}
    _settled(burst_home, done.job_id)


@pytest.mark.parametrize("plant", ["not a pickle", "not a dict", "over the limit"])
def test_a_bad_values_file_is_one_error_and_the_job_settles(ip: Any, tmp_path: Path, burst_home: Path,
                                                            monkeypatch: pytest.MonkeyPatch, plant: str) -> None:
    """A malformed, non-dict or oversized values file: one clear error, and the job still syncs back, ends and
    is billed (it used to raise inside the teardown: the cell hung, the reservation stayed held, no ledger row)."""
    blob = {"not a pickle": b"\x80\x04garbage", "not a dict": pickle.dumps([1, 2, 3]),
            "over the limit": b"\x80\x04" + os.urandom(64 * 1024)}[plant]
    monkeypatch.setenv("BURST_PULL_BYTES", str(32 * 1024))
    python = _hostile(tmp_path, blob)
    done = _run(ip, tmp_path, python, "--pull x", CELL)
    assert done.status is JobStatus.FAILED
    error = str(done.error)
    assert "\n" not in error
    if plant == "over the limit":
        assert isinstance(done.error, SyncError) and "BURST_PULL_BYTES" in error
    else:
        assert isinstance(done.error, VariableError) and "not one burst writes" in error
    assert "x" not in ip.user_ns
    assert last_job().done()
    _settled(burst_home, done.job_id)
