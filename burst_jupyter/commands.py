"""The one table of subcommands that ``%burst COMMAND`` (magics.py) and ``burst COMMAND`` (cli.py) route through.

Each :class:`Command` declares its name, its help, its options, where it is offered (a notebook's ``%burst``, a
terminal's ``burst``, or both) and what it does; the two adapters differ only in how a result is shown: the line
magic returns it to the notebook, the console script prints it (``--json``: as one JSON document) and turns it
into an exit status. Options that are job options come from options.py. Imports nothing heavy: the line magic's
help is written from this table at ``%load_ext``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from .errors import ConfigError
from .options import OFFER_SEARCH, add_options, by_name, for_line

if TYPE_CHECKING:
    from .budget import GroupKey

__all__ = ["COMMANDS", "Command", "dispatch", "help_text", "parser"]

#: ``%burst`` in a notebook, ``burst`` in a terminal.
Where = Literal["%burst", "burst"]

GROUPS = ("day", "provider", "gpu", "status")


def _none(parser: argparse.ArgumentParser, where: Where) -> None:
    return None


def _same(value: Any) -> Any:
    return value


def _print(value: Any, args: argparse.Namespace) -> int:
    print(repr(value))
    return 0


def _status(code: int, args: argparse.Namespace) -> int:
    return code  # a terminal's own command printed as it went


@dataclass(frozen=True)
class Command:
    """One subcommand. ``run`` takes the parsed line and returns its result; ``shown`` is what ``%burst`` returns
    to the notebook for it, ``printed`` prints it for ``burst`` and says the exit status."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], Any]
    options: Callable[[argparse.ArgumentParser, Where], None] = _none
    where: tuple[Where, ...] = ("%burst", "burst")
    shown: Callable[[Any], Any] = _same
    printed: Callable[[Any, argparse.Namespace], int] = _print


def _json(parser: argparse.ArgumentParser, where: Where) -> None:
    if where == "burst":
        parser.add_argument("--json", action="store_true", help="print one JSON document for scripts (money as "
                            "decimal strings; README: From a terminal)")


def _job(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB")


# -- what each command takes --------------------------------------------------------------------------------------


def _submit_options(p: argparse.ArgumentParser, where: Where) -> None:
    add_options(p, for_line("submit"))
    p.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS",
                   help="the command (unless --file or --command)")


def _show_options(p: argparse.ArgumentParser, where: Where) -> None:
    _job(p)
    p.add_argument("--lines", type=int, default=50, metavar="N", help="the last N lines of output (default 50)")
    p.add_argument("--events", action="store_true", help="also every status event, with its time")
    _json(p, where)


def _kill_options(p: argparse.ArgumentParser, where: Where) -> None:
    _job(p)
    p.add_argument("--wait", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the job to end (default 180)")


def _offers_options(p: argparse.ArgumentParser, where: Where) -> None:
    from .widgets.offer_table import SORT_KEYS

    add_options(p, [by_name(name) for name in OFFER_SEARCH], **OFFER_SEARCH)
    p.add_argument("--sort", choices=list(SORT_KEYS), default="price")
    p.add_argument("--refresh", action="store_true", help="ask every provider again, past the offer cache")
    _json(p, where)


def _providers_options(p: argparse.ArgumentParser, where: Where) -> None:
    p.add_argument("action", nargs="?", choices=["status"], default="status")
    _json(p, where)


def _ledger_options(p: argparse.ArgumentParser, where: Where) -> None:
    p.add_argument("group", nargs="?", metavar="|".join(GROUPS), help="group the rows by this")
    p.add_argument("--by", metavar="|".join(GROUPS), help="the same")
    _json(p, where)


def _budget_options(p: argparse.ArgumentParser, where: Where) -> None:
    p.add_argument("action", nargs="?", choices=["show", "set"], help="show (the default) or set the caps")
    for flag in ("--daily", "--weekly"):  # `--daily` alone is an amount left out: said as such, not as argparse
        p.add_argument(flag, nargs="?", const="", metavar="USD|none", help="the cap (none clears it)")
    _json(p, where)


def _cleanup_options(p: argparse.ArgumentParser, where: Where) -> None:
    p.add_argument("--dry-run", action="store_true", help="list them with their $/h and cost so far; end nothing")


# -- what each command does ---------------------------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    from .cli import submit

    return submit(args)


def _list(args: argparse.Namespace) -> int:
    from .cli import list_jobs

    return list_jobs(args)


def _show(args: argparse.Namespace) -> int:
    from .cli import show

    return show(args)


def _kill(args: argparse.Namespace) -> int:
    from .cli import kill

    return kill(args)


def _offers(args: argparse.Namespace) -> Any:
    from . import api
    from .spec import parse_money

    max_price = None if args.max_price is None else parse_money(args.max_price, what="--max-price")
    browser = api.offers(args.gpu, gpus=args.gpus, max_price=max_price, provider=args.provider,
                         min_reliability=args.min_reliability, spot=args.spot, prototyping=args.prototyping,
                         refresh=args.refresh)
    if args.sort != browser.sort_key:
        browser.sort_by(args.sort)
    return browser


def _print_offers(browser: Any, args: argparse.Namespace) -> int:
    if args.json:
        from .cli_json import dumps, offer_json
        from .widgets.offer_table import sort_offers

        result = browser.result
        print(dumps({"offers": [offer_json(o) for o in sort_offers(result.offers, args.sort)],
                     "left_out": result.left_out, "errors": result.errors, "error": browser.error}))
    else:
        print(browser.snapshot_text())
    return 0


def _providers(args: argparse.Namespace) -> Any:
    from . import api

    return api.provider_status()


def _print_providers(status: Any, args: argparse.Namespace) -> int:
    from .cli_json import dumps, providers_json

    print(dumps(providers_json(status)) if args.json else repr(status))
    return 0


def _ledger(args: argparse.Namespace) -> Any:
    from . import api

    table = api.ledger()
    group = args.group or args.by
    if group is None:
        return table
    if group not in GROUPS:
        raise ConfigError(f"{args.prefix}ledger {group}: group by one of {', '.join(GROUPS)}")
    return table.by(cast("GroupKey", group))


def _print_ledger(table: Any, args: argparse.Namespace) -> int:
    from .cli_json import dumps, ledger_json

    print(dumps(ledger_json(table)) if args.json else repr(table))
    return 0


def _budget(args: argparse.Namespace) -> Any:
    from . import api
    from .session import Session

    for flag, value, setter in (("--daily", args.daily, api.set_daily_budget),
                                ("--weekly", args.weekly, api.set_weekly_budget)):
        if value == "":
            raise ConfigError(f"{args.prefix}budget {flag} needs an amount in USD (or none)")
        if value is not None:
            setter(None if value.lower() == "none" else value)
    return Session.current().budget.snapshot()


def _budget_bars(snapshot: Any) -> Any:
    from .widgets import BudgetBars

    return BudgetBars(snapshot)


def _print_budget(snapshot: Any, args: argparse.Namespace) -> int:
    if args.json:
        from .cli_json import budget_json, dumps

        print(dumps(budget_json(snapshot)))
    else:
        print(snapshot)  # "Today: $12.50 / $50.00 (25%)" and "This week: ...", then each cap and its source
        print("\n".join(snapshot.cap_lines()))
    return 0


def _jobs(args: argparse.Namespace) -> Any:
    from . import api

    return api.jobs()


def _shutdown(args: argparse.Namespace) -> None:
    from . import api

    handed = api.shutdown()
    print(f"burst: handed {len(handed)} job(s) to the reaper" + (f": {', '.join(handed)}" if handed else ""))


def _up_options(p: argparse.ArgumentParser, where: Where) -> None:
    add_options(p, for_line("up"))


def _up(args: argparse.Namespace) -> Any:
    from .options import FLAGS, IDLE_MINUTES, job_fields
    from .session import Session
    from .spec import JobSpec

    fields = job_fields(args, "up")
    fields.setdefault("idle_minutes", IDLE_MINUTES)
    return Session.current().up(JobSpec.build(FLAGS, **fields))


def _down_options(p: argparse.ArgumentParser, where: Where) -> None:
    p.add_argument("name", nargs="?", metavar="NAME", help="the machine (default: every kept machine)")


def _down(args: argparse.Namespace) -> None:
    from .errors import one_line
    from .money import format_usd
    from .session import Session

    results = Session.current().down(args.name)
    if not results:
        print("burst: no kept machine is up")
    for result in results:
        cost = "cost not known yet (burst ledger)" if result.total_cost_usd is None else \
            f"settled {format_usd(result.total_cost_usd)}"
        n = len(result.files)
        files = f"synced back {n} file{'' if n == 1 else 's'} · " if n else ""
        error = f" · {one_line(result.error)}" if result.error is not None else ""
        print(f"burst: machine job {result.job_id} down · {files}{cost}{error}")


def _machines(args: argparse.Namespace) -> Any:
    from .session import Session

    return Session.current().machines_table()


def _cleanup(args: argparse.Namespace) -> Any:
    from . import api

    return api.cleanup(dry_run=args.dry_run)


def _print_cleanup(report: Any, args: argparse.Namespace) -> int:
    print(report)
    return 0 if report.ok else 1


COMMANDS: tuple[Command, ...] = (
    Command("submit", "run a command or a Python file and wait for it", _submit, _submit_options, ("burst",),
            printed=_status),
    Command("offers", "live offers across the configured marketplaces: filters, a sortable table, refresh (in a "
            "notebook: insert a cell)", _offers, _offers_options, printed=_print_offers),
    Command("providers", "each marketplace: configured, reachable, lowest price for common GPUs", _providers,
            _providers_options, printed=_print_providers),
    Command("ledger", "what every job cost (grouped when a key is given)", _ledger, _ledger_options,
            printed=_print_ledger),
    Command("budget", "today's and this week's spend against the caps; --daily/--weekly set the caps (\"none\" "
            "clears)", _budget, _budget_options, shown=_budget_bars, printed=_print_budget),
    Command("jobs", "the jobs this kernel started", _jobs, where=("%burst",)),
    Command("list", "jobs still holding an instance, and whose they are", _list, _json, ("burst",),
            printed=_status),
    Command("show", "a job's status, cost and output, from any process", _show, _show_options, ("burst",),
            printed=_status),
    Command("kill", "end a job early: sync back, terminate, settle", _kill, _kill_options, ("burst",),
            printed=_status),
    Command("up", "rent a machine and keep it across cells: %%burst cells without placement options run in its "
            "one Python process, so names persist (--idle MINUTES, --name, --max-cost for all its cells)", _up,
            _up_options, where=("%burst",)),
    Command("down", "bring a kept machine down (NAME, or all): sync back, destroy, confirm gone, settle", _down,
            _down_options, where=("%burst",)),
    Command("machines", "the kept machines of this kernel: where, $/h, spent of cap, idle countdown, cells",
            _machines, where=("%burst",)),
    Command("shutdown", "hand every job of this kernel to a detached reaper (sync back, terminate, settle)",
            _shutdown, where=("%burst",)),
    Command("cleanup", "end what no live job owns: jobs of processes that are gone (synced back, settled) and "
            "instances a marketplace lists with this install's tag that no job knows (--dry-run lists them with "
            "their $/h and cost so far)", _cleanup, _cleanup_options, printed=_print_cleanup),
)


class _Refusing(argparse.ArgumentParser):
    """A notebook's parser: a bad line is one ConfigError line (a UsageError in the cell), never a SystemExit
    (nor a -h that exits: ``%burst help`` and ``%burst?`` say what each command takes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"add_help": False, **kwargs})

    def error(self, message: str) -> Any:
        raise ConfigError(f"{self.prog}: {message}")


def _fill(p: argparse.ArgumentParser, command: Command, where: Where) -> argparse.ArgumentParser:
    command.options(p, where)
    p.set_defaults(handler=command, prefix="%burst " if where == "%burst" else "")
    return p


def _offered(where: Where) -> list[Command]:
    return [c for c in COMMANDS if where in c.where]


def parser(where: Where) -> argparse.ArgumentParser:
    """Every command ``where`` offers, with its options (``burst --help``; the notebook's: what ``%burst`` takes)."""
    cls = argparse.ArgumentParser if where == "burst" else _Refusing
    p = cls(prog=where, description="Run work on a rented GPU for a known, capped price.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for command in _offered(where):
        _fill(sub.add_parser(command.name, help=command.help, description=command.help), command, where)
    return p


def dispatch(words: Sequence[str]) -> Any:
    """``%burst WORDS``: the command's result as the notebook shows it; ConfigError for a line it cannot take."""
    command = next((c for c in _offered("%burst") if c.name == words[0]), None)
    if command is None:
        names = ", ".join(c.name for c in _offered("%burst"))
        raise ConfigError(f"%burst {words[0]}: unknown command; try {names} or help")
    p = _fill(_Refusing(prog=f"%burst {command.name}"), command, "%burst")
    args, extra = p.parse_known_args(list(words[1:]))
    if extra:
        known = ", ".join(a.option_strings[0] for a in p._actions if a.option_strings)
        raise ConfigError(f"%burst {command.name}: unknown option {extra[0]!r} "
                          + (f"(only {known})" if known else "(it takes none)"))
    return command.shown(command.run(args))


def help_text(where: Where) -> str:
    """The commands ``where`` offers, one line each (``%burst?``: written at ``%load_ext``, no parser is built)."""
    import textwrap

    lines = (textwrap.fill(c.help, 110, initial_indent=f"  {c.name:<10} ", subsequent_indent=" " * 13)
             for c in _offered(where))
    return "\n".join([f"{where} COMMAND [OPTIONS]", "", *lines])
