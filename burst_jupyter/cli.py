"""The ``burst`` command: the same engine, state store and ledger as the notebook, from a terminal.

    burst submit --max-cost 1 --mount ./out:out:rw -- python train.py
    burst submit --image ghcr.io/org/img:1 --gpus 1 --gpu-model RTX_4090 --max-cost-usd 10 \\
                 --command "mts1b-backtest batch --config /data/sweep.yaml"
    burst submit --gpu H100 --max-cost 5 --dry-run --command "python train.py"
    burst submit --file sweep.py --provider ssh --host gpu1,gpu2 --rate 0.40
    burst list                       jobs holding an instance: provider, $/h, whose
    burst show JOB [--lines N] [--events]
    (list, show, offers, ledger, budget and providers take --json: one JSON document for scripts)
    burst kill JOB
    burst budget show | burst budget set --daily 50 --weekly 200
    burst providers status
    burst offers --gpu RTX_4090 --max-price 0.5 [--sort price|gpu_price|memory|reliability] [--refresh]
    burst ledger [--by day|provider|gpu|status]
    burst cleanup [--dry-run]        end what no live job owns (dry run: list it, with $/h and cost so far)

Exit status: 0 success, 1 the job failed (or was stopped; for cleanup: a provider could not be asked or an
instance could not be ended), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import shlex
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BurstError, ConfigError, RemoteError

if TYPE_CHECKING:
    from .budget import LedgerRow
    from .events import JobEvent
    from .session import Session
    from .state import OwnedInstance

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .widgets.offer_table import SORT_KEYS

    p = argparse.ArgumentParser(prog="burst", description="Run work on a rented GPU for a known, capped price.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("submit", help="run a command or a Python file and wait for it")
    s.add_argument("--file", "-f", type=Path, help="a Python file to run like a notebook cell")
    s.add_argument("--command", "-c", dest="command_line", metavar='"PROGRAM ARGS"',
                   help="a command line, split as a shell would (or give -- PROGRAM ARGS at the end)")
    s.add_argument("--name", "-n")
    s.add_argument("--provider", "-p", help="auto, local, ssh, vast, runpod or thunder")
    s.add_argument("--image", help="container image (marketplace providers)")
    s.add_argument("--gpu", "--gpu-model", dest="gpu", help="RTX_4090, H100, A100_80GB, ANY ...")
    s.add_argument("--gpus", type=int)
    s.add_argument("--memory", type=int, metavar="GB", help="minimum GPU memory per GPU")
    s.add_argument("--max-cost", "--max-cost-usd", dest="max_cost", metavar="USD", help="hard cap on the bill")
    s.add_argument("--max-price", metavar="USD_PER_HOUR", help="ceiling on the machine's hourly price")
    s.add_argument("--max-duration", type=int, metavar="MINUTES")
    s.add_argument("--spot", action="store_true", default=None, help="interruptible capacity (vast, runpod)")
    s.add_argument("--min-reliability", type=float, metavar="0..1")
    s.add_argument("--offer", metavar="PROVIDER:ID", help="rent exactly this offer (from burst offers)")
    s.add_argument("--provision-timeout", type=float, metavar="SECONDS")
    s.add_argument("--rate", metavar="USD_PER_HOUR", help="declared $/h for local and ssh machines")
    s.add_argument("--mount", "-m", action="append", default=[], metavar="LOCAL:REMOTE[:ro|:rw]")
    s.add_argument("--host", metavar="H1,H2")
    s.add_argument("--trust-new-host", action="store_true", default=None)
    s.add_argument("--python", metavar="PATH")
    s.add_argument("--lease", type=int, metavar="SECONDS", help="stop the job if this process is silent this long")
    s.add_argument("--retries", type=int, metavar="N", help="after a preemption, relaunch on the next offer N times")
    s.add_argument("--sync-every", type=int, metavar="SECONDS", help="bring rw mounts back this often while running")
    s.add_argument("--sink", metavar="URL", help="also store rw results in URL/<job id>/ (folder, s3://, r2://)")
    s.add_argument("--max-results", metavar="SIZE", help="most rw results brought back (default 20GB)")
    s.add_argument("--dry-run", action="store_true", help="show the offer and the worst case; rent nothing")
    s.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS",
                   help="the command (unless --file or --command)")

    _json_flag(sub.add_parser("list", help="jobs still holding an instance, and whose they are"))

    sh = sub.add_parser("show", help="a job's status, cost and output, from any process")
    sh.add_argument("job", metavar="JOB")
    sh.add_argument("--lines", type=int, default=50, metavar="N", help="the last N lines of output (default 50)")
    sh.add_argument("--events", action="store_true", help="also every status event, with its time")
    _json_flag(sh)

    k = sub.add_parser("kill", help="end a job early: sync back, terminate, settle")
    k.add_argument("job", metavar="JOB")
    k.add_argument("--wait", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the job to end (default 180)")

    b = sub.add_parser("budget", help="show or set the daily and weekly caps")
    bsub = b.add_subparsers(dest="action", required=True)
    _json_flag(bsub.add_parser("show"))
    bset = bsub.add_parser("set")
    bset.add_argument("--daily", metavar="USD|none")
    bset.add_argument("--weekly", metavar="USD|none")
    _json_flag(bset)

    pr = sub.add_parser("providers", help="each marketplace: configured, reachable, lowest prices")
    pr.add_argument("action", nargs="?", choices=["status"], default="status")
    _json_flag(pr)

    o = sub.add_parser("offers", help="live offers across the configured marketplaces")
    o.add_argument("--gpu", "--gpu-model", dest="gpu")
    o.add_argument("--gpus", type=int, default=1)
    o.add_argument("--max-price", metavar="USD_PER_HOUR")
    o.add_argument("--provider", "-p")
    o.add_argument("--min-reliability", type=float, metavar="0..1")
    o.add_argument("--spot", action="store_true")
    o.add_argument("--sort", choices=list(SORT_KEYS), default="price")
    o.add_argument("--refresh", action="store_true", help="ask every provider again, past the offer cache")
    _json_flag(o)

    led = sub.add_parser("ledger", help="what every job cost")
    led.add_argument("--by", choices=["day", "provider", "gpu", "status"])
    _json_flag(led)

    c = sub.add_parser("cleanup", help="end what no live job owns: jobs of processes that are gone (synced back, "
                       "settled) and instances a marketplace lists with this install's tag that no job knows")
    c.add_argument("--dry-run", action="store_true", help="list them with their $/h and cost so far; end nothing")
    return p


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document for scripts (money as decimal strings; README: From a terminal)")


# -- submit ---------------------------------------------------------------------------------------------------


def _command(args: argparse.Namespace) -> list[str] | None:
    program = list(args.program)
    if program[:1] == ["--"]:
        program = program[1:]  # only the separator: a `--` meant for the program stays
    if args.command_line is None:
        return program or None
    if program:
        raise ConfigError('give --command "PROGRAM ARGS" or -- PROGRAM ARGS, not both')
    try:
        words = shlex.split(args.command_line)
    except ValueError as exc:
        raise ConfigError(f"--command {args.command_line!r}: {exc}") from None
    if not words:
        raise ConfigError("--command is empty")
    return words


def _spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    from .spec import parse_money

    command = _command(args)
    if (args.file is None) == (command is None):
        raise ConfigError('give one of --file FILE.py, --command "PROGRAM ARGS" or -- PROGRAM ARGS')
    fields: dict[str, Any] = {"command": command}
    if args.file is not None:
        try:
            fields = {"cell": args.file.read_text(), "cell_file": str(args.file), "name": args.file.stem}
        except OSError as exc:
            raise ConfigError(f"--file {args.file}: {exc.strerror or exc}") from None
    money = {"max_cost_usd": (args.max_cost, "--max-cost"), "rate_usd_per_hour": (args.rate, "--rate"),
             "max_price_usd_per_hour": (args.max_price, "--max-price")}
    for key, (text, what) in money.items():
        if text is not None:
            fields[key] = parse_money(text, what=what)
    plain = {"name": args.name, "provider": args.provider or ("ssh" if args.host else None), "image": args.image,
             "gpu_model": args.gpu, "gpus": args.gpus, "memory_gb": args.memory,
             "max_duration_minutes": args.max_duration, "spot": args.spot, "min_reliability": args.min_reliability,
             "offer": args.offer, "provision_timeout_seconds": args.provision_timeout,
             "remote_python": args.python, "ssh_trust_on_first_use": args.trust_new_host,
             "lease_seconds": args.lease, "retries": args.retries, "sync_every_seconds": args.sync_every,
             "result_sink": args.sink, "max_results_bytes": args.max_results, "mount_local": args.mount or None,
             "ssh_hosts": [h.strip() for h in args.host.split(",") if h.strip()] if args.host else None}
    fields.update({key: value for key, value in plain.items() if value is not None})
    return fields


def _submit(args: argparse.Namespace) -> int:
    from .display import CellDisplay
    from .session import Session
    from .spec import OPTIONS, JobSpec

    spec = JobSpec.build(OPTIONS, **_spec_fields(args))
    session = Session.current()
    if args.dry_run:
        print(repr(session.dry_run(spec)))
        return 0
    job = session.submit(spec, namespace={})
    result = CellDisplay(job, None).run_blocking()
    if isinstance(result.error, RemoteError):
        sys.stderr.write("\n".join(result.error._render_traceback_()) + "\n")  # escapes already stripped
        return 1
    if result.error is not None:
        print(f"burst: job {job.id} {result.status.value}: {result.error}", file=sys.stderr)
        return 1
    if result.status.value != "completed":
        print(f"burst: job {job.id} {result.status.value}", file=sys.stderr)
        return 1
    return 0


# -- one job, from any process: show and kill --------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """What this machine knows of one job: its state row, its event log and its ledger rows, one per attempt (each
    may be absent)."""

    job_id: str
    owned: OwnedInstance | None
    events: list[JobEvent]
    attempts: list[LedgerRow]  # oldest attempt first

    @property
    def ledger(self) -> LedgerRow | None:
        """The last attempt's row: how the job ended."""
        return self.attempts[-1] if self.attempts else None

    @property
    def billed(self) -> Decimal | None:
        """What every attempt cost together; None when any cost is unknown."""
        costs = [r.actual_usd for r in self.attempts]
        return None if not costs or None in costs else sum((c for c in costs if c is not None), Decimal(0))

    @property
    def final(self) -> JobEvent | None:
        return next((e for e in reversed(self.events) if e.is_final), None)

    @property
    def live(self) -> bool:
        from .state import LIVE_STATES

        return self.owned is not None and self.owned.state in LIVE_STATES

    @property
    def ended(self) -> bool:
        return self.final is not None or (self.ledger is not None and not self.live)

    def latest(self, name: str) -> Any:
        """The newest event's value of ``name`` (a JobEvent field), or None."""
        return next((getattr(e, name) for e in reversed(self.events) if getattr(e, name) is not None), None)

    def status(self) -> str:
        final = self.final
        if final is not None:
            return final.type.value
        if self.ledger is not None and not self.live:
            return str(self.ledger.status)
        o = self.owned
        if o is not None and self.live:
            if o.orphaned:
                return "orphaned (its process is gone; `burst kill` or `burst cleanup` ends it)"
            if o.reaper_pid is not None and _alive(o.reaper_pid):
                return f"being finished by the reaper (pid {o.reaper_pid})"
        if o is not None and o.state == "abandoned":
            return "ended (nothing was rented)"
        if any(e.type.value == "started" for e in self.events):
            return "running"
        if not self.events:
            return o.state if o is not None else "unknown"
        phase = next((e.type.value for e in reversed(self.events) if e.type.value not in ("output", "progress")), None)
        return "queued" + (f" ({phase.replace('_', ' ')})" if phase not in (None, "queued") else "")


def _first(*values: Any) -> Any:
    """The first value that is not None ($0 is a value)."""
    return next((v for v in values if v is not None), None)


def _alive(pid: int) -> bool:
    from .agent import pid_alive

    return pid_alive(pid)


def _find(session: Session, job_id: str) -> _Record:
    """The job's record; ConfigError (exit 2) naming close matches when nothing here knows ``job_id``."""
    from .job_log import known_job_ids, read_events, valid_job_id

    owned = session.state.get(job_id) if valid_job_id(job_id) else None
    events = read_events(job_id, session.home)
    rows = session.budget.rows()
    attempts = sorted((r for r in rows if r.job_id == job_id), key=lambda r: r.attempt)
    if owned is None and events is None and not attempts:
        import difflib

        known = dict.fromkeys([*known_job_ids(session.home), *(o.job_id for o in session.state.live()),
                               *(r.job_id for r in reversed(rows))])
        close = difflib.get_close_matches(job_id, list(known), n=3, cutoff=0.6)
        hint = (f"; did you mean {' or '.join(close)}?" if close
                else " (burst list shows the running jobs, burst ledger the finished ones)")
        raise ConfigError(f"no job {job_id!r}{hint}")
    return _Record(job_id, owned, events or [], attempts)


def _facts(rec: _Record) -> dict[str, Any]:
    """What ``burst show`` says of a job, as values: the text view and ``--json`` both render these."""
    from .job import cost_of

    o, led = rec.owned, rec.ledger
    h = o.handoff if o is not None else {}
    rate = _first(rec.latest("cost_per_hour_usd"), o.rate_usd_per_hour if o else None,
                  led.rate_usd_per_hour if led else None)
    final = rec.final
    settled = (final is not None and final.total_cost_usd is not None) or (led is not None and not rec.live)
    so_far = None
    if not settled and o is not None and rec.live and rate is not None and h.get("launched_at"):
        # As the reaper counts it: from this attempt's create request, at the last known rate (never under).
        so_far = cost_of(rate, (dt.datetime.now(dt.timezone.utc) - o.billing_since).total_seconds())
    live_owner = o if o is not None and rec.live else None
    return {
        "status": rec.status(),
        "name": _first(h.get("name"), led.name if led else None),
        "provider": _first(rec.latest("provider"), o.provider if o else None, led.provider if led else None),
        "instance_id": _first(o.instance_id if o else None, rec.latest("instance_id"),
                              led.instance_id if led else None),
        "gpu": _first(rec.latest("gpu"), h.get("gpu"), led.gpu if led else None),
        "rate_usd_per_hour": rate,
        "max_cost_usd": _first(rec.latest("max_cost_usd"),
                               Decimal(h["max_cost_usd"]) if h.get("max_cost_usd") else None),
        "cost_settled": settled,  # cost_usd is the job's whole bill (None: unknown), else cost_so_far_usd
        "cost_usd": (final.total_cost_usd if final is not None and final.total_cost_usd is not None
                     else rec.billed) if settled else None,
        "cost_so_far_usd": so_far,
        "owner": None if live_owner is None else {"host": live_owner.owner.host, "pid": live_owner.owner.pid,
                                                  "gone": live_owner.orphaned},
        "error": final.error if final is not None and final.error else None,
        "note": led.message if led is not None and led.message and not rec.live else None,
    }


def _show(args: argparse.Namespace) -> int:
    from .budget import LedgerTable
    from .money import format_rate, format_usd
    from .session import Session
    from .widgets.render import clean_text

    rec = _find(Session.current(), args.job)
    f = _facts(rec)
    if args.json:
        from .cli_json import dumps

        output = _output_lines(rec.events)
        print(dumps({"job_id": rec.job_id, **f, "output": output[-args.lines:] if args.lines > 0 else [],
                     "output_lines": len(output), "events": [e for e in rec.events if e.type.value != "output"],
                     "attempts": rec.attempts}))
        return 0
    lines = [f"job {rec.job_id}: {f['status']}"]
    if f["name"]:
        lines.append(f"  name:     {f['name']}")
    if f["provider"]:
        where = ", ".join(x for x in (f"instance {f['instance_id']}" if f["instance_id"] else None, f["gpu"]) if x)
        lines.append(f"  provider: {f['provider']}" + (f" ({where})" if where else ""))
    if f["rate_usd_per_hour"] is not None:
        lines.append(f"  rate:     {format_rate(f['rate_usd_per_hour'])}/h")
    cap = f["max_cost_usd"]
    cost = (f"{format_usd(f['cost_usd'])} in all" if f["cost_settled"] else
            f"about {format_usd(f['cost_so_far_usd'])} so far" if f["cost_so_far_usd"] is not None else None)
    if cost or cap is not None:
        lines.append("  cost:     " + ", ".join(x for x in (cost, f"cap {format_usd(cap)}" if cap is not None
                                                             else None) if x))
    if f["owner"] is not None:
        lines.append(f"  owner:    pid {f['owner']['pid']} on {f['owner']['host']}"
                     + (" (gone)" if f["owner"]["gone"] else ""))
    if f["error"]:
        lines.append(f"  error:    {f['error']}")
    elif f["note"]:
        lines.append(f"  note:     {f['note']}")
    if not rec.events and rec.ledger is None:
        lines.append("  (no event log for this job: it was started before job logs were kept, or elsewhere)")
    print(clean_text("\n".join(lines)))  # the error and the note quote the instance: no escapes reach the terminal
    if args.events:
        print("events:")
        for e in rec.events:
            if e.type.value != "output":
                print(f"  {e.at.astimezone():%H:%M:%S}  {clean_text(e.describe())}")
    _print_output(rec.events, args.lines)
    if rec.ledger is not None:
        print("ledger:")
        print(repr(LedgerTable(rec.attempts)))
    return 0


def _output_lines(events: list[JobEvent]) -> list[str]:
    return "".join(e.text or "" for e in events if e.type.value == "output").splitlines()


def _print_output(events: list[JobEvent], limit: int) -> None:
    from .widgets.render import clean_text

    if limit <= 0:
        return
    out = _output_lines(events)
    if not out:
        print("output: none yet" if not any(e.is_final for e in events) else "output: none")
        return
    shown = out[-limit:]
    hidden = len(out) - len(shown)
    print(f"output (last {len(shown)} of {len(out)} lines; --lines N for more):" if hidden else "output:")
    for line in shown:
        print(f"  {clean_text(line)}")  # remote text: no terminal escapes reach the user's terminal


def _kill(args: argparse.Namespace) -> int:
    from .money import format_usd
    from .session import Session

    if not math.isfinite(args.wait) or args.wait < 0:
        raise ConfigError(f"--wait must be a number of seconds, 0 or more, not {args.wait}")
    session = Session.current()
    rec = _find(session, args.job)
    if rec.ended and not (rec.live and rec.owned is not None and rec.owned.orphaned):
        print(f"job {rec.job_id} already ended: {rec.status()}")
        return 0
    deadline = time.monotonic() + args.wait
    asked = waiting = False
    problem = ""
    while True:
        o = rec.owned
        if o is not None and rec.live and o.orphaned:
            return _reap(session, o)
        if rec.ended:
            final = rec.final
            total = final.total_cost_usd if final is not None else rec.billed
            print(f"job {rec.job_id} ended: {rec.status()}, {format_usd(total)} in all"
                  + (" (synced back, terminated, settled)" if rec.status() == "cancelled" else ""))
            return 0
        reaping = o is not None and o.reaper_pid is not None and _alive(o.reaper_pid)
        if o is not None and rec.live and not asked and not reaping:
            try:
                asked = _ask_agent_to_stop(session, o)
            except (BurstError, OSError, EOFError) as exc:
                problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not asked and not waiting:
            waiting = True
            print(f"job {rec.job_id} is {rec.status()}: waiting for it to end" if reaping else
                  f"job {rec.job_id} is {rec.status()}: waiting for its agent to start, to stop it there")
        if time.monotonic() > deadline:
            why = f" ({problem})" if problem else ""
            print(f"burst: job {rec.job_id} is still {rec.status()} after {args.wait:.0f} s{why}; "
                  f"`burst show {rec.job_id}` to follow it", file=sys.stderr)
            return 1
        time.sleep(0.25)
        rec = _find(session, rec.job_id)


def _ask_agent_to_stop(session: Session, owned: OwnedInstance) -> bool:
    """The stop the lifecycle itself sends: the agent interrupts the command and exits "cancelled"; the owning
    process sees that in its stream, syncs back, terminates and settles as it always does. False while the job
    has no agent to ask yet (still provisioning, or uploading)."""
    from .providers.base import Endpoint

    h = owned.handoff
    if "endpoint" not in h or "workdir" not in h:
        return False
    endpoint = Endpoint.from_json(h["endpoint"])
    client = session.connections.agent(endpoint, h["python"], h["workdir"])
    status = client.status()
    if not status.get("exists"):
        return False
    if status.get("running"):
        client.stop("cancelled")
        print(f"asked job {owned.job_id}'s agent on {endpoint} to stop; its owner (pid {owned.owner.pid} on "
              f"{owned.owner.host}) syncs back, terminates the instance and settles the bill")
    else:
        print(f"job {owned.job_id}'s command already ended; its owner is bringing the results back")
    return True


def _reap(session: Session, owned: OwnedInstance) -> int:
    from .money import format_usd
    from .reaper import reap

    print(f"job {owned.job_id}: its process (pid {owned.owner.pid} on {owned.owner.host}) is gone; ending it here")
    (outcome,) = reap([owned], state=session.state, budget=session.budget, connections=session.connections,
                      home=session.home, reason="burst kill")
    if not outcome.terminated:
        print(f"burst: job {owned.job_id}: {outcome.problem}; `burst cleanup` tries again", file=sys.stderr)
        return 1
    print(f"job {owned.job_id} cancelled: synced back {outcome.synced} file(s), terminated, settled "
          f"{format_usd(outcome.cost_usd)}" + (f" ({outcome.problem})" if outcome.problem else ""))
    return 0


# -- the rest ---------------------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    from .money import format_rate
    from .session import Session

    live = Session.current().state.live()
    if args.json:
        from .cli_json import dumps, owned_json

        print(dumps([owned_json(o) for o in live]))
        return 0
    if not live:
        print("no job holds an instance")
        return 0
    rows = [("JOB", "PROVIDER", "INSTANCE", "$/H", "STATE", "OWNER")]
    for o in live:
        rate = o.rate_usd_per_hour
        whose = "orphaned" if o.orphaned else f"pid {o.owner.pid}@{o.owner.host}"
        rows.append((o.job_id, o.provider, o.instance_id or "(launching)",
                     format_rate(rate) if rate is not None else "-", o.state, whose))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _offers(args: argparse.Namespace) -> int:
    from . import api
    from .spec import parse_money

    max_price = None if args.max_price is None else parse_money(args.max_price, what="--max-price")
    browser = api.offers(args.gpu, gpus=args.gpus, max_price=max_price, provider=args.provider,
                         min_reliability=args.min_reliability, spot=args.spot, refresh=args.refresh)
    if args.json:
        from .cli_json import dumps, offer_json
        from .widgets.offer_table import sort_offers

        result = browser.result
        print(dumps({"offers": [offer_json(o) for o in sort_offers(result.offers, args.sort)],
                     "errors": result.errors, "error": browser.error}))
        return 0
    browser.sort_by(args.sort)
    print(browser.snapshot_text())
    return 0


def _run(args: argparse.Namespace) -> int:
    from . import api
    from .cli_json import budget_json, dumps, ledger_json, providers_json

    if args.cmd == "submit":
        return _submit(args)
    if args.cmd == "list":
        return _list(args)
    if args.cmd == "show":
        return _show(args)
    if args.cmd == "kill":
        return _kill(args)
    if args.cmd == "providers":
        status = api.provider_status()
        print(dumps(providers_json(status)) if args.json else repr(status))
        return 0
    if args.cmd == "offers":
        return _offers(args)
    if args.cmd == "budget":
        if args.action == "set":
            for value, setter in ((args.daily, api.set_daily_budget), (args.weekly, api.set_weekly_budget)):
                if value is not None:
                    setter(None if value.lower() == "none" else value)
        from .session import Session

        snapshot = Session.current().budget.snapshot()
        if args.json:
            print(dumps(budget_json(snapshot)))
        else:
            print(snapshot)  # "Today: $12.50 / $50.00 (25%)" and "This week: ...", then each cap and its source
            print("\n".join(snapshot.cap_lines()))
        return 0
    if args.cmd == "ledger":
        table = api.ledger()
        table = table.by(args.by) if args.by else table
        print(dumps(ledger_json(table)) if args.json else repr(table))
        return 0
    if args.cmd == "cleanup":
        report = api.cleanup(dry_run=args.dry_run)
        print(report)
        return 0 if report.ok else 1
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has said why
        return exc.code if isinstance(exc.code, int) else 2
    from .session import Session

    # Called in a process that already has a session (a notebook, a test): leave it, and its running jobs, alone.
    own_session = Session._current is None
    try:
        return _run(args)
    except BurstError as exc:
        print(f"burst: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # A job's own line (JobInterrupted) says what became of it; a bare Ctrl-C came before any job.
        print(str(exc) or "burst: interrupted", file=sys.stderr)
        return 130
    finally:
        if own_session:
            Session.reset_current()


if __name__ == "__main__":
    sys.exit(main())
