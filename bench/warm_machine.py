"""A cell on a warm kept machine (``%burst up``) against plain OpenSSH on loopback, measured in the same run.

    python bench/warm_machine.py [--runs 10]

Starts a real sshd on loopback (tests/sshd.py), brings one kept machine up on it (provider ``ssh``), then times,
median of ``--runs``:

- baseline: ``ssh -p PORT 127.0.0.1 python3 -c 'print(1)'`` with the OpenSSH client, to its first output line
- a ``print(1)`` cell on the warm machine, from submit to its first output line (and to its end: results back,
  its folder there removed, its share recorded)
- the same cell with a ``--mount`` of 200 files already on the machine and unchanged (nothing to send), to its end;
  beside it the same cell without the mount, so the ratio is what the no-change mount costs

Targets (issue 12): time to first output on a warm machine no more than plain ssh (ratio <= 1.0), and a no-change
mount on a warm machine under 0.3 s on loopback (the mount's own cost: the difference of the last two rows).
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


def warm_cell(**spec: object) -> tuple[float, float]:
    """A ``print(1)`` cell on the machine that is up: seconds to its first output line, and to its end."""
    from burst_jupyter.events import EventType
    from burst_jupyter.session import Session
    from burst_jupyter.spec import JobSpec

    first_output = threading.Event()
    stamps: dict[str, float] = {}
    t0 = time.perf_counter()
    job = Session.current().submit(JobSpec(cell="print(1)", **spec), namespace={})  # type: ignore[arg-type]

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
    fn()  # warm the page cache and imports (and, for a mount, its first upload); not counted
    firsts, totals = zip(*(fn() for _ in range(runs)), strict=True)
    first, total = statistics.median(firsts), statistics.median(totals)
    print(f"  {name:<38} first line {first * 1000:7.1f} ms   total {total * 1000:7.1f} ms", flush=True)
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
        data = work / "data"
        data.mkdir()
        for i in range(200):
            (data / f"f{i:03d}.txt").write_text(f"{i}\n" * 100)
        with start_sshd(work / "sshd") as server:
            os.environ["BURST_SSH_CONFIG"] = str(server.ssh_config_path)
            import burst_jupyter as burst

            python = "python3"
            print(f"a cell on a warm kept machine, median of {args.runs} runs, loopback sshd on port {server.port}")
            base = measure("OpenSSH ssh python3 print(1)",
                           lambda: plain_ssh(server.ssh_argv(f"{python} -c 'print(1)'")), args.runs)
            burst.up(provider="ssh", ssh_hosts=[server.alias], remote_python=python, max_cost_usd="1", idle=30)
            try:
                warm = measure("burst, warm machine", warm_cell, args.runs)
                mounted = measure("burst, warm + unchanged mount (200 f)",
                                  lambda: warm_cell(mount_local=[f"{data}:data:ro"]), args.runs)
            finally:
                burst.down()
            print("\nratios to plain OpenSSH (lower is better; target: first line <= 1.0x)")
            print(f"  warm machine, first line {warm[0] / base[0]:5.2f}x   total {warm[1] / base[1]:5.2f}x")
            cost = mounted[1] - warm[1]
            print(f"\nan unchanged mount of 200 files on the warm machine adds {cost * 1000:.0f} ms to a cell "
                  f"(target < 300 ms); the whole cell with it: {mounted[1] * 1000:.0f} ms")
            from burst_jupyter.session import Session

            Session.reset_current()
    return 0


if __name__ == "__main__":
    sys.exit(main())
