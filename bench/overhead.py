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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cell_timing import burst_cell, measure, plain_ssh, sshd_bench


def burst_on(provider: str, *, fresh_session: bool, **spec: object) -> tuple[float, float]:
    from burst_jupyter.session import Session

    if fresh_session:
        Session.reset_current()
    return burst_cell(provider=provider, **spec)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with sshd_bench() as (_, server):
        import paramiko  # noqa: F401  (imported once per kernel; not part of a cell's cost)

        python = "python3"
        print(f"burst overhead, median of {args.runs} runs, loopback sshd on port {server.port}")
        base = measure("OpenSSH ssh python3 print(1)",
                       lambda: plain_ssh(server.ssh_argv(f"{python} -c 'print(1)'")), args.runs)
        rows = {
            "burst local": measure("burst local", lambda: burst_on("local", fresh_session=False), args.runs),
            "burst ssh (cold)": measure(
                "burst ssh, new connection",
                lambda: burst_on("ssh", fresh_session=True, ssh_hosts=[server.alias], remote_python=python),
                args.runs),
            "burst ssh (warm)": measure(
                "burst ssh, warm connection",
                lambda: burst_on("ssh", fresh_session=False, ssh_hosts=[server.alias], remote_python=python),
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
