"""Issue 9, section 7: a flood of output, or a stream with no newline, is bounded everywhere on this machine.

The limits are the real options (``BURST_NOTEBOOK_OUTPUT_CHARS``, ``BURST_LOG_BYTES``), lowered so tens of MB
make the point. Memory is measured on a real kernel (``VmRSS`` from ``/proc``), never a duration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from burst_checks import cell, ledger_rows, local_jobdirs, open_reservations, run_cell, tampered_agent
from kernels import Kernel

from burst_jupyter import agent
from burst_jupyter.errors import UnsafeResults
from burst_jupyter.job import JobStatus
from burst_jupyter.output import OutputBounds
from burst_jupyter.remote import MAX_LINE

pytestmark = pytest.mark.timeout(180)

NOTEBOOK_CHARS = 200_000
LOG_BYTES = 4 << 20
FLOOD_MB = 64

# 1 KiB numbered lines, FLOOD_MB MiB of them, then a line with no newline as long as the flood itself, then the
# last words: the head, the tail and the count in between can all be checked.
FLOOD_CELL = f"""
import sys
line = "." * 1013 + "\\n"
for i in range({FLOOD_MB} * 1024):
    sys.stdout.write(f"line {{i:06d}}" + line)
sys.stdout.write("y" * ({FLOOD_MB} << 20))
print()
open("out/after.txt", "w").write("written after the flood")
print("the last words")
"""


def _rss_kb(kernel: Kernel) -> int:
    out = kernel.run_ok("print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0])").text("stdout")
    return int(out.split()[1])


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURST_NOTEBOOK_OUTPUT_CHARS", str(NOTEBOOK_CHARS))
    monkeypatch.setenv("BURST_LOG_BYTES", str(LOG_BYTES))


def test_a_flood_shows_a_head_and_a_tail_and_the_kernel_stays_flat(limits: None, tmp_path: Path, work: Path,
                                                                   burst_home: Path) -> None:
    (work / "out").mkdir(exist_ok=True)
    kernel = Kernel(tmp_path, burst_home=burst_home, cwd=work)
    try:
        kernel.run_ok("%load_ext burst_jupyter")
        kernel.run_ok("%%burst --provider local --rate 1\nprint('warm')")  # imports and first-job costs paid
        before = _rss_kb(kernel)
        run = kernel.run_ok(f"%%burst --provider local --rate 1 --mount ./out:out:rw\n{FLOOD_CELL}", timeout=150)
        grown_mb = (_rss_kb(kernel) - before) / 1024
        shown = run.text()
        print(f"the kernel grew by {grown_mb:.1f} MB for {2 * FLOOD_MB} MB of output")
    finally:
        kernel.close()
    # The notebook got a bounded head and tail, and a line saying how much was left out and where all of it is.
    assert len(shown) < 2 * NOTEBOOK_CHARS
    assert shown.startswith("line 000000") and "line 000001" in shown
    assert shown.rstrip().endswith("the last words")
    (job_id,) = [row.job_id for row in ledger_rows(burst_home)][-1:]
    log = burst_home / "logs" / "jobs" / f"{job_id}.out"
    assert "characters of output left out here" in shown and f"is in {log}" in shown
    # The logs on disk are capped, and say so.
    assert log.stat().st_size < LOG_BYTES + 1024
    assert log.read_text().startswith("line 000000") and "more output was not kept" in log.read_text()
    events = burst_home / "logs" / "jobs" / f"{job_id}.jsonl"
    assert events.stat().st_size < LOG_BYTES + 1024
    assert json.loads(events.read_text().splitlines()[-1])["type"] == "completed"
    # The kernel held none of it: well under the flood's size (it grew by more than the flood before).
    assert grown_mb < FLOOD_MB / 4, f"the kernel grew by {grown_mb:.0f} MB for {2 * FLOOD_MB} MB of output"
    assert (work / "out" / "after.txt").read_text() == "written after the flood"


# A hostile machine: the real agent runs the cell, but what it streams back is one line that never ends.
ENDLESS_LINE = """
def endless(jobdir, offset, stdin):
    sys.stdout.buffer.write(b'{{"k":"started","pid":1,"t":0}}\\n')
    chunk = b"x" * (1 << 20)
    for _ in range({megabytes}):
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    return 0

ns["attach_main"] = endless
"""


def test_a_record_line_that_never_ends_is_refused_and_the_job_settles(ip: Any, tmp_path: Path,
                                                                      burst_home: Path) -> None:
    python = tampered_agent(tmp_path / "hostile-python", ENDLESS_LINE.format(megabytes=3 * MAX_LINE >> 20))
    result, streams = run_cell(ip, cell(f"--provider local --rate 1 --python {python} --background", "x = 1"))
    assert result.error_in_exec is None, streams.text(ours=True)
    done = result.result.wait(timeout=120)
    assert done.status is JobStatus.FAILED and isinstance(done.error, UnsafeResults)
    assert f"longer than {MAX_LINE} bytes" in str(done.error)
    assert [row.job_id for row in ledger_rows(burst_home)] == [done.job_id]
    assert open_reservations(burst_home) == [] and local_jobdirs(burst_home) == []


def test_a_transfer_chunk_over_its_bound_is_refused_before_it_is_read() -> None:
    """A results transfer whose chunk header claims 2 GiB: refused at the header, nothing of it held."""
    import io
    import struct

    from burst_jupyter import agent

    hostile = io.BytesIO(struct.pack(">I", 1 << 31) + b"x" * (1 << 20))
    with pytest.raises(EOFError, match="a transfer chunk of 2147483648 bytes"):
        agent.ChunkedReader(hostile).read(512)
    assert hostile.tell() == 4


# A hostile machine that never stops answering a short command, on stdout and on stderr.
CHATTY_PYTHON = """#!{python}
import sys
chunk = b"z" * (1 << 20)
for _ in range({megabytes}):
    sys.stderr.buffer.write(chunk)
    sys.stdout.buffer.write(chunk)
"""


@pytest.mark.ssh
def test_a_short_command_that_never_stops_answering_is_cut_off(tmp_path: Path) -> None:
    """Over a real sshd: ``status`` answered with more than MAX_ANSWER bytes is an error, not a buffer, and of
    the stderr only its last bytes are kept (a flood there fills nothing)."""
    from sshd import start_sshd

    from burst_jupyter.connections import Connections
    from burst_jupyter.providers.base import Endpoint
    from burst_jupyter.runner import MAX_ANSWER

    python = tmp_path / "chatty-python"
    python.write_text(CHATTY_PYTHON.format(python=sys.executable, megabytes=2 * MAX_ANSWER >> 20))
    python.chmod(0o755)
    with start_sshd(tmp_path / "sshd") as server:
        endpoint = Endpoint(host=server.host, port=server.port, user=server.user,
                            key_path=str(server.client_key_path), trust_on_first_use=True,
                            known_hosts=str(tmp_path / "known_hosts"))
        connections = Connections()
        try:
            client = connections.agent(endpoint, str(python), str(tmp_path / "job"))
            with pytest.raises(OSError, match=f"answered with more than {MAX_ANSWER} bytes"):
                client.status()
            proc = connections.get(endpoint).start([str(python)])
            while proc.read():
                pass
            assert proc.wait(30) == 0
            assert 0 < len(proc.stderr()) <= 64 * 1024
            proc.close()
        finally:
            connections.close_all()


def test_displays_past_the_notebook_bound_are_left_out_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell that displays without end (a plot per step) costs the notebook no more than one that prints."""
    monkeypatch.setenv("BURST_NOTEBOOK_OUTPUT_CHARS", "20000")
    bounds = OutputBounds(None)
    shown = sum(bounds.admit({"text/plain": "x" * 1000}) for _ in range(100))
    assert 0 < shown < 20
    (note,) = bounds.finish()
    assert note[0] == "stderr" and f"{100 - shown} displayed outputs (plots, tables) left out" in note[1]


def test_a_display_the_json_of_which_would_overflow_a_frame_keeps_what_fits() -> None:
    """Each format is within its bound, but JSON spells a character outside ASCII in six: the biggest formats are
    left out until the bundle fits a frame (a frame over its bound would stop the cell's later prints)."""
    wide = "\u4e2d" * (500 * 1024)
    data: dict[str, object] = {"text/plain": "t", "text/html": wide, "text/markdown": wide + "x", "image/png": "iVBO"}
    payload = agent._display_payload(data)
    assert len(payload) <= agent._MAX_FRAME // 2
    assert json.loads(payload) == {"text/plain": "t", "text/html": wide, "image/png": "iVBO"}  # the Markdown left out
