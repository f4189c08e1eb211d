"""A kept machine (%burst up) driven from a real ipykernel through jupyter_client, on the local provider and its
real agent: state across cells, Ctrl-C that keeps the machine, and the limits its agent holds with the kernel
killed (its idle limit, its cap across cells)."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from kernels import Kernel, processes_mentioning, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]


def machine_dir(burst_home: Path) -> Path:
    (jobdir,) = wait_for(lambda: list((burst_home / "local").iterdir()), timeout=10, what="the machine's folder")
    return jobdir


def exit_record(jobdir: Path) -> dict[str, object] | None:
    path = jobdir / "exit.json"
    return json.loads(path.read_text()) if path.exists() else None


def ends_by_itself(jobdir: Path, reason: str) -> None:
    """The machine's agent stopped it for ``reason`` and nothing of it runs any more (on local it keeps its folder,
    with the results, for the next kernel's cleanup)."""
    record = wait_for(lambda: exit_record(jobdir), timeout=60, what=f"the machine's exit ({reason})")
    assert record["reason"] == reason, record
    wait_for(lambda: not processes_mentioning(str(jobdir)), timeout=30, what="the machine's processes to end")
    assert not (jobdir / "work").exists()  # its scratch folder removed: nothing left running or writing there


def test_two_cells_share_state_and_ctrl_c_keeps_the_machine(start_kernel: Callable[[], Kernel],
                                                            burst_home: Path) -> None:
    kernel = start_kernel()
    kernel.run_ok("%burst up --provider local --max-cost 1 --name box")
    kernel.run_ok("%%burst\nweights = [0.5] * 3\nprint('loaded')")
    shown = kernel.run_ok("%%burst\nsum(weights)")
    (value,) = shown.of_type("execute_result")
    assert value["content"]["data"]["text/plain"] == "1.5"
    looping = kernel.submit("%%burst\nimport time\nprint('looping', flush=True)\nwhile True: time.sleep(0.05)")
    kernel.pump_until(lambda: "looping" in looping.text("stdout"), timeout=30, what="the loop")
    kernel.km.interrupt_kernel()
    kernel.finish(looping)
    assert looping.status == "error"
    (error,) = looping.of_type("error")
    assert "machine box kept" in error["content"]["evalue"], error["content"]
    again = kernel.run_ok("%%burst\nprint(len(weights))")
    assert again.text("stdout").startswith("3\n")
    listed = kernel.run_ok("%burst machines")
    (table,) = listed.of_type("execute_result")
    assert "box" in table["content"]["data"]["text/plain"] and "<table" in table["content"]["data"]["text/html"]
    down = kernel.run_ok("%burst down box")
    assert "down" in down.text("stdout") and "settled" in down.text("stdout")
    assert list((burst_home / "local").iterdir()) == []


def test_an_idle_machine_ends_itself_with_the_kernel_killed(start_kernel: Callable[[], Kernel],
                                                            burst_home: Path) -> None:
    kernel = start_kernel()
    # A lease far longer than the test: only the idle limit (three seconds) can end it.
    kernel.run_ok("%burst up --provider local --max-cost 1 --idle 0.05 --lease 3600")
    jobdir = machine_dir(burst_home)
    kernel.km.signal_kernel(signal.SIGKILL)
    kernel.wait_dead()
    ends_by_itself(jobdir, "idle")


def test_the_cap_across_cells_holds_with_the_kernel_killed(start_kernel: Callable[[], Kernel],
                                                           burst_home: Path) -> None:
    kernel = start_kernel()
    # 36 $/h is a cent a second: 15 cents are 15 seconds of this machine, whatever its cells do.
    kernel.run_ok("%burst up --provider local --rate 36 --max-cost 0.15 --lease 3600 --idle 60")
    jobdir = machine_dir(burst_home)
    kernel.run_ok("%%burst\nx = 1")
    forever = kernel.submit("%%burst --background\nimport time\nwhile True: time.sleep(0.1)")
    kernel.finish(forever)
    wait_for(lambda: list((jobdir / "c").iterdir()) if (jobdir / "c").is_dir() else [], timeout=10,
             what="the second cell on the machine")
    kernel.km.signal_kernel(signal.SIGKILL)
    kernel.wait_dead()
    ends_by_itself(jobdir, "budget")
    manifest = json.loads((jobdir / "job.json").read_text())
    assert (manifest["cap_usd"], manifest["rate_usd_per_hour"]) == ("0.15", "36")
