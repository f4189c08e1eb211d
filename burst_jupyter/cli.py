"""The ``burst`` command: the same engine, state store and ledger as the notebook, from a terminal.

    burst submit --max-cost 1 --mount ./out:out:rw -- python train.py
    burst submit --file sweep.py --provider ssh --host gpu1,gpu2 --rate 0.40
    burst list
    burst budget show | burst budget set --daily 50 --weekly 200
    burst ledger [--by day|provider|gpu|status]
    burst cleanup [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import BurstError, RemoteError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="burst", description="Run work on a rented GPU for a known, capped price.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("submit", help="run a command or a Python file and wait for it")
    s.add_argument("--file", "-f", type=Path, help="a Python file to run like a notebook cell")
    s.add_argument("--name", "-n")
    s.add_argument("--provider", "-p")
    s.add_argument("--gpu")
    s.add_argument("--gpus", type=int)
    s.add_argument("--max-cost", metavar="USD")
    s.add_argument("--max-duration", type=int, metavar="MINUTES")
    s.add_argument("--rate", metavar="USD_PER_HOUR")
    s.add_argument("--mount", "-m", action="append", default=[], metavar="LOCAL:REMOTE[:ro|:rw]")
    s.add_argument("--host", metavar="H1,H2")
    s.add_argument("--trust-new-host", action="store_true", default=None)
    s.add_argument("--python", metavar="PATH")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS... (unless --file)")

    sub.add_parser("list", help="jobs still holding an instance, and whose they are")

    b = sub.add_parser("budget", help="show or set the daily and weekly caps")
    bsub = b.add_subparsers(dest="action", required=True)
    bsub.add_parser("show")
    bset = bsub.add_parser("set")
    bset.add_argument("--daily", metavar="USD|none")
    bset.add_argument("--weekly", metavar="USD|none")

    led = sub.add_parser("ledger", help="what every job cost")
    led.add_argument("--by", choices=["day", "provider", "gpu", "status"])

    c = sub.add_parser("cleanup", help="end instances left by kernels that are gone")
    c.add_argument("--dry-run", action="store_true")
    return p


def _submit(args: argparse.Namespace) -> int:
    from .display import CellDisplay
    from .session import Session
    from .spec import JobSpec, parse_money

    command = [a for a in args.command if a != "--"] or None
    if (args.file is None) == (command is None):
        raise BurstError("give either --file FILE.py or -- PROGRAM ARGS...")
    fields: dict[str, Any] = {"command": command}
    if args.file is not None:
        fields = {"cell": args.file.read_text(), "name": args.file.stem}
    for key, value in (("name", args.name), ("provider", args.provider or ("ssh" if args.host else None)),
                       ("gpu_model", args.gpu), ("gpus", args.gpus), ("max_duration_minutes", args.max_duration),
                       ("remote_python", args.python), ("ssh_trust_on_first_use", args.trust_new_host)):
        if value is not None:
            fields[key] = value
    if args.max_cost is not None:
        fields["max_cost_usd"] = parse_money(args.max_cost, what="--max-cost")
    if args.rate is not None:
        fields["rate_usd_per_hour"] = parse_money(args.rate, what="--rate")
    if args.mount:
        fields["mount_local"] = args.mount
    if args.host:
        fields["ssh_hosts"] = [h.strip() for h in args.host.split(",") if h.strip()]
    job = Session.current().submit(JobSpec.build(**fields), namespace={})
    result = CellDisplay(job, None).run_blocking()
    if isinstance(result.error, RemoteError):
        sys.stderr.write("\n".join(result.error._render_traceback_()) + "\n")
        return 1
    if result.error is not None:
        raise result.error
    return 0


def _run(args: argparse.Namespace) -> int:
    from . import api

    if args.cmd == "submit":
        return _submit(args)
    if args.cmd == "list":
        from .session import Session

        live = Session.current().state.live()
        for o in live:
            whose = "orphaned" if o.orphaned else f"pid {o.owner.pid}@{o.owner.host}"
            print(f"{o.job_id}  {o.provider}  {o.instance_id or '(launching)'}  {o.state}  {whose}")
        if not live:
            print("no job holds an instance")
        return 0
    if args.cmd == "budget":
        if args.action == "set":
            for value, setter in ((args.daily, api.set_daily_budget), (args.weekly, api.set_weekly_budget)):
                if value is not None:
                    setter(None if value.lower() == "none" else value)
        print(repr(api.budget_bars()))
        return 0
    if args.cmd == "ledger":
        table = api.ledger()
        print(repr(table.by(args.by) if args.by else table))
        return 0
    if args.cmd == "cleanup":
        outcome = api.cleanup(dry_run=args.dry_run)
        if args.dry_run:
            print("\n".join(map(str, outcome)) or "nothing to clean up")
        else:
            for line in outcome:
                print(line)
            if not outcome:
                print("nothing to clean up")
        return 0
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except BurstError as exc:
        print(f"burst: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("burst: interrupted (the job was cancelled and cleaned up)", file=sys.stderr)
        return 130
    finally:
        from .session import Session

        Session.reset_current()


if __name__ == "__main__":
    sys.exit(main())
