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

Every command is routed through commands.py, the table ``%burst`` uses too; ``burst submit``'s options are
options.py's. What this module holds is what only a terminal does: run a job to its end (submit), and list, show
and kill jobs of any process on this machine.
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
from .processes import pid_alive

if TYPE_CHECKING:
    from .budget import LedgerRow
    from .events import JobEvent
    from .session import Session
    from .state import OwnedInstance

__all__ = ["main"]


# -- submit ---------------------------------------------------------------------------------------------------


def _command(args: argparse.Namespace) -> list[str] | None:
    program = list(args.program)
    if program[:1] == ["--"]:
        program = program[1:]  # only the separator: a `--` meant for the program stays
    if args.command is None:
        return program or None
    if program:
        raise ConfigError('give --command "PROGRAM ARGS" or -- PROGRAM ARGS, not both')
    try:
        words = shlex.split(args.command)
    except ValueError as exc:
        raise ConfigError(f"--command {args.command!r}: {exc}") from None
    if not words:
        raise ConfigError("--command is empty")
    return words


def _spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    from .options import job_fields

    command = _command(args)
    if (args.file is None) == (command is None):
        raise ConfigError('give one of --file FILE.py, --command "PROGRAM ARGS" or -- PROGRAM ARGS')
    fields: dict[str, Any] = {"command": command}
    if args.file is not None:
        path = Path(args.file)
        try:
            fields = {"cell": path.read_text(), "cell_file": str(path), "name": path.stem}
        except OSError as exc:
            raise ConfigError(f"--file {path}: {exc.strerror or exc}") from None
    return fields | job_fields(args, "submit")


def submit(args: argparse.Namespace) -> int:
    from .display import CellDisplay
    from .options import FLAGS
    from .session import Session
    from .spec import JobSpec

    spec = JobSpec.build(FLAGS, **_spec_fields(args))
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
            if o.reaper_pid is not None and pid_alive(o.reaper_pid):
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
    from .handoff import Handoff
    from .job import cost_of

    o, led = rec.owned, rec.ledger
    h = o.handoff if o is not None else Handoff()
    rate = _first(rec.latest("cost_per_hour_usd"), o.rate_usd_per_hour if o else None,
                  led.rate_usd_per_hour if led else None)
    final = rec.final
    settled = (final is not None and final.total_cost_usd is not None) or (led is not None and not rec.live)
    so_far = None
    if not settled and o is not None and rec.live and rate is not None and h.launched_at is not None:
        # As the reaper counts it: from this attempt's create request, at the last known rate (never under).
        so_far = cost_of(rate, (dt.datetime.now(dt.timezone.utc) - o.billing_since).total_seconds())
    live_owner = o if o is not None and rec.live else None
    return {
        "status": rec.status(),
        "name": _first(h.name, led.name if led else None),
        "provider": _first(rec.latest("provider"), o.provider if o else None, led.provider if led else None),
        "instance_id": _first(o.instance_id if o else None, rec.latest("instance_id"),
                              led.instance_id if led else None),
        "gpu": _first(rec.latest("gpu"), h.gpu, led.gpu if led else None),
        "rate_usd_per_hour": rate,
        "max_cost_usd": _first(rec.latest("max_cost_usd"), h.max_cost_usd),
        "cost_settled": settled,  # cost_usd is the job's whole bill (None: unknown), else cost_so_far_usd
        "cost_usd": (final.total_cost_usd if final is not None and final.total_cost_usd is not None
                     else rec.billed) if settled else None,
        "cost_so_far_usd": so_far,
        "owner": None if live_owner is None else {"host": live_owner.owner.host, "pid": live_owner.owner.pid,
                                                  "gone": live_owner.orphaned},
        "error": final.error if final is not None and final.error else None,
        "note": led.message if led is not None and led.message and not rec.live else None,
    }


def show(args: argparse.Namespace) -> int:
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


def kill(args: argparse.Namespace) -> int:
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
        reaping = o is not None and o.reaper_pid is not None and pid_alive(o.reaper_pid)
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
    from .agent import Reason

    client = owned.handoff.agent(session.connections)
    if client is None:
        return False
    status = client.status()
    if not status.get("exists"):
        return False
    if status.get("running"):
        client.stop(Reason.CANCELLED)
        print(f"asked job {owned.job_id}'s agent on {owned.handoff.endpoint} to stop; its owner (pid "
              f"{owned.owner.pid} on {owned.owner.host}) syncs back, terminates the instance and settles the bill")
    else:
        print(f"job {owned.job_id}'s command already ended; its owner is bringing the results back")
    return True


def _reap(session: Session, owned: OwnedInstance) -> int:
    from .money import format_usd
    from .reaper import reap

    print(f"job {owned.job_id}: its process (pid {owned.owner.pid} on {owned.owner.host}) is gone; ending it here")
    (outcome,) = reap([owned], session.parts, reason="burst kill")
    if not outcome.terminated:
        print(f"burst: job {owned.job_id}: {outcome.problem}; `burst cleanup` tries again", file=sys.stderr)
        return 1
    print(f"job {owned.job_id} cancelled: synced back {outcome.synced} file(s), terminated, settled "
          f"{format_usd(outcome.cost_usd)}" + (f" ({outcome.problem})" if outcome.problem else ""))
    return 0


# -- the rest ---------------------------------------------------------------------------------------------------


def list_jobs(args: argparse.Namespace) -> int:
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
    from .widgets.render import aligned_rows

    print("\n".join(aligned_rows(rows)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .commands import parser

    try:
        args = parser("burst").parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse has said why
        return exc.code if isinstance(exc.code, int) else 2
    from .session import Session

    # Called in a process that already has a session (a notebook, a test): leave it, and its running jobs, alone.
    own_session = Session._current is None
    try:
        return int(args.handler.printed(args.handler.run(args), args))
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
