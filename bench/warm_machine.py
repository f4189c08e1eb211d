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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cell_timing import burst_cell, measure, plain_ssh, sshd_bench


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with sshd_bench() as (work, server):
        data = work / "data"
        data.mkdir()
        for i in range(200):
            (data / f"f{i:03d}.txt").write_text(f"{i}\n" * 100)
        import burst_jupyter as burst

        python = "python3"
        print(f"a cell on a warm kept machine, median of {args.runs} runs, loopback sshd on port {server.port}")
        base = measure("OpenSSH ssh python3 print(1)",
                       lambda: plain_ssh(server.ssh_argv(f"{python} -c 'print(1)'")), args.runs)
        burst.up(provider="ssh", ssh_hosts=[server.alias], remote_python=python, max_cost_usd="1", idle=30)
        try:
            warm = measure("burst, warm machine", burst_cell, args.runs)
            mounted = measure("burst, warm + unchanged mount (200 f)",
                              lambda: burst_cell(mount_local=[f"{data}:data:ro"]), args.runs)
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
