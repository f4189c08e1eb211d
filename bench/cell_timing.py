"""What bench/overhead.py and bench/warm_machine.py both use: a throwaway burst home beside a real sshd on loopback,
and the two things they time: a command through the OpenSSH client, and a burst cell from submit to its first
output line and to its end, each the median of several runs after one not counted."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sshd import start_sshd  # tests/ is on sys.path: the bench scripts put it there

__all__ = ["burst_cell", "measure", "plain_ssh", "sshd_bench"]


@contextlib.contextmanager
def sshd_bench() -> Iterator[tuple[Path, Any]]:
    """In a temporary folder: a burst home of its own, no settings file, and a real sshd on loopback that burst's
    ssh provider reaches through the ssh config it names. Yields the folder and the server."""
    with tempfile.TemporaryDirectory(prefix="burst-bench-") as tmp:
        work = Path(tmp)
        os.environ["BURST_HOME"] = str(work / "home")
        os.environ["BURST_CONFIG"] = str(work / "none.toml")
        os.chdir(work)
        with start_sshd(work / "sshd") as server:
            os.environ["BURST_SSH_CONFIG"] = str(server.ssh_config_path)
            yield work, server


def plain_ssh(argv: list[str]) -> tuple[float, float]:
    """Seconds to the command's first output line, and to its end."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.readline()
    first = time.perf_counter() - t0
    proc.wait()
    return first, time.perf_counter() - t0


def burst_cell(**spec: Any) -> tuple[float, float]:
    """A ``print(1)`` cell through the current session (wherever ``spec`` sends it): seconds to its first output
    line, and to its end (results back, the machine ended or the cell's folder removed, settled)."""
    from burst_jupyter.events import EventType
    from burst_jupyter.session import Session
    from burst_jupyter.spec import JobSpec

    first_output = threading.Event()
    stamps: dict[str, float] = {}
    t0 = time.perf_counter()
    job = Session.current().submit(JobSpec(cell="print(1)", **spec), namespace={})

    def listen(event: object) -> None:
        if getattr(event, "type", None) is EventType.OUTPUT and "first" not in stamps:
            stamps["first"] = time.perf_counter() - t0
            first_output.set()

    job.add_listener(listen)
    result = job.wait(timeout=60)
    total = time.perf_counter() - t0
    if result.error is not None:
        raise result.error
    return stamps["first"], total


def measure(name: str, fn: Callable[[], tuple[float, float]], runs: int) -> tuple[float, float]:
    """The medians of ``runs`` calls of ``fn`` after one not counted (page cache, imports, a first upload)."""
    fn()
    firsts, totals = zip(*(fn() for _ in range(runs)), strict=True)
    first, total = statistics.median(firsts), statistics.median(totals)
    print(f"  {name:<38} first line {first * 1000:7.1f} ms   total {total * 1000:7.1f} ms", flush=True)
    return first, total
