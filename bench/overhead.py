"""What burst adds to a trivial cell, against plain OpenSSH on loopback, measured in the same run.

    python bench/overhead.py [--runs 10]

Starts a real sshd on loopback (tests/sshd.py), then times, median of ``--runs``:

- baseline: ``ssh -p PORT 127.0.0.1 python3 -c 'print(1)'`` with the OpenSSH client (a fresh connection each time)
- burst on ``local``: a ``print(1)`` cell, from submit to the first output line, and to the end (terminated,
  confirmed, settled)
- burst on ``ssh`` to the same sshd, cold: a fresh session and connection each run, like the baseline
- burst on ``ssh``, warm: the session's connection reused, as for every cell after a kernel's first

Each is printed as a ratio to the baseline's time to first output line and total time. Target: total within
1.5x of plain OpenSSH on loopback. Python's own start-up on the remote is in both sides of the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sshd import start_sshd


def plain_ssh(argv: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.readline()
    first = time.perf_counter() - t0
    proc.wait()
    return first, time.perf_counter() - t0


def burst_cell(provider: str, *, fresh_session: bool, **spec: object) -> tuple[float, float]:
    from burst_jupyter.events import EventType
    from burst_jupyter.session import Session
    from burst_jupyter.spec import JobSpec

    if fresh_session:
        Session.reset_current()
    session = Session.current()
    first_output = threading.Event()
    t0 = time.perf_counter()
    job = session.submit(JobSpec(cell="print(1)", provider=provider, **spec), namespace={})
    stamps: dict[str, float] = {}

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
    fn()  # warm the page cache and imports; not counted
    firsts, totals = zip(*(fn() for _ in range(runs)), strict=True)
    first, total = statistics.median(firsts), statistics.median(totals)
    print(f"  {name:<28} first line {first * 1000:7.1f} ms   total {total * 1000:7.1f} ms", flush=True)
    return first, total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="burst-bench-") as tmp:
        work = Path(tmp)
        os.environ["BURST_HOME"] = str(work / "home")
        os.environ["BURST_CONFIG"] = str(work / "none.toml")
        os.chdir(work)
        with start_sshd(work / "sshd") as server:
            os.environ["BURST_SSH_CONFIG"] = str(server.ssh_config_path)
            import paramiko  # noqa: F401  (imported once per kernel; not part of a cell's cost)

            python = "python3"
            print(f"burst overhead, median of {args.runs} runs, loopback sshd on port {server.port}")
            base = measure("OpenSSH ssh python3 print(1)",
                           lambda: plain_ssh(server.ssh_argv(f"{python} -c 'print(1)'")), args.runs)
            rows = {
                "burst local": measure("burst local", lambda: burst_cell("local", fresh_session=False), args.runs),
                "burst ssh (cold)": measure(
                    "burst ssh, new connection",
                    lambda: burst_cell("ssh", fresh_session=True, ssh_hosts=[server.alias], remote_python=python),
                    args.runs),
                "burst ssh (warm)": measure(
                    "burst ssh, warm connection",
                    lambda: burst_cell("ssh", fresh_session=False, ssh_hosts=[server.alias], remote_python=python),
                    args.runs),
            }
            print("\nratios to plain OpenSSH (lower is better; target: total <= 1.5x)")
            for name, (first, total) in rows.items():
                print(f"  {name:<20} first line {first / base[0]:5.2f}x   total {total / base[1]:5.2f}x")
            from burst_jupyter.session import Session

            Session.reset_current()
    return 0


if __name__ == "__main__":
    sys.exit(main())
