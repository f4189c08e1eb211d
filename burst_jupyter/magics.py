"""``%%burst`` and ``%burst``: thin adapters that parse options into a JobSpec and hand it to the Session.

Defaults come, lowest first, from built-ins, the user config file, ``[tool.burst]`` in the project's
pyproject.toml, ``%config BurstMagics.<name> = ...``, and the options of the cell. Every failure of the user's
input becomes one ``UsageError`` line; a remote exception shows its remote traceback and fails the cell.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Int, Unicode, Union
from traitlets import List as ListTrait

from .errors import BurstError, ConfigError, RemoteError

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from .budget import GroupKey
    from .job import Job
    from .session import Session
    from .spec import JobSpec

__all__ = ["BurstMagics"]

_GROUPS = ("day", "provider", "gpu", "status")
_MONEY = Union([Int(), Float(), Unicode()], default_value=None, allow_none=True)


def _split_line(line: str) -> list[str]:
    """The words of a magic's line, as a shell splits them: quotes group and are removed (IPython's own split
    keeps them, so ``--offer "runpod:NVIDIA GeForce RTX 4090"`` arrived quoted). Backslashes stay literal, as in
    Windows paths."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.escape, lexer.commenters = True, "", ""
    try:
        return list(lexer)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"%%burst: {exc}") from None


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


@magics_class
class BurstMagics(Magics):
    """Run a cell on a rented GPU (or your own boxes) for a known, capped price."""

    provider = Unicode(None, allow_none=True, help="Default provider: auto, local or ssh.").tag(config=True)
    max_cost = _MONEY.tag(config=True)
    max_cost.help = "Default cap on one job's bill, USD."
    max_duration = Int(None, allow_none=True, help="Default maximum run time, minutes.").tag(config=True)
    rate = Union([Int(), Float(), Unicode()], default_value=None, allow_none=True,
                 help="Declared $/h for local and ssh machines.").tag(config=True)
    hosts = ListTrait(Unicode(), default_value=None, allow_none=True,
                      help="Default SSH hosts for --provider ssh.").tag(config=True)
    trust_new_hosts = Bool(None, allow_none=True, help="Accept and remember unknown SSH host keys.").tag(config=True)
    remote_python = Unicode(None, allow_none=True, help="Python on the instance.").tag(config=True)
    lease = Int(None, allow_none=True, help="Seconds of client silence after which the agent stops the job.").tag(
        config=True)
    max_results = Union([Int(), Unicode()], default_value=None, allow_none=True,
                        help="Most rw results one job brings back, e.g. '50GB' (default 20GB).").tag(config=True)

    def __init__(self, shell: Any, session_factory: Any = None) -> None:
        super().__init__(shell)
        self._session_factory = session_factory

    @property
    def ip(self) -> InteractiveShell:
        assert self.shell is not None  # registered magics always have their shell
        return self.shell

    @property
    def session(self) -> Session:
        from .session import Session

        return self._session_factory() if self._session_factory else Session.current()

    # -- %%burst --------------------------------------------------------------------------------------------

    @magic_arguments()
    @argument("--provider", "-p", help="Where to run: auto (default: the cheapest configured marketplace for a "
              "--gpu job, else your --host boxes, else this machine), local, ssh, vast, runpod, thunder.")
    @argument("--gpu", help="GPU model: RTX_4090, H100, A100_80GB, ANY ... (default: no GPU required).")
    @argument("--gpus", type=int, help="Number of GPUs (default 1).")
    @argument("--memory", type=int, metavar="GB", help="Minimum GPU memory per GPU, GB.")
    @argument("--max-cost", metavar="USD", help="Hard cap on this job's bill, USD.")
    @argument("--max-price", metavar="USD_PER_HOUR", help="Ceiling on the hourly price of the machine.")
    @argument("--max-duration", type=int, metavar="MINUTES", help="Stop the job after this many minutes.")
    @argument("--spot", action="store_true", default=None,
              help="Rent interruptible capacity (cheaper, may be preempted): Vast bids, RunPod spot.")
    @argument("--min-reliability", type=float, metavar="0..1", help="Skip offers the provider scores below this.")
    @argument("--offer", metavar="PROVIDER:ID", help="Rent exactly this offer (from %%burst offers).")
    @argument("--provision-timeout", type=float, metavar="SECONDS",
              help="One limit on boot, image pull and SSH readiness of a rented machine.")
    @argument("--dry-run", action="store_true", help="Show the offer it would rent and the worst-case cost; rent "
              "nothing.")
    @argument("--rate", metavar="USD_PER_HOUR", help="Declared $/h for local and ssh machines (default 0).")
    @argument("--mount", "-m", action="append", default=[], metavar="LOCAL:REMOTE[:ro|:rw]",
              help="Upload a folder (ro), or upload it and sync it back after the run (rw). Repeatable.")
    @argument("--push", metavar="A,B", help="Notebook variables to send to the cell.")
    @argument("--pull", metavar="C,D", help="Variables to bring back into the notebook after the run.")
    @argument("--host", metavar="H1,H2", help="SSH hosts ([user@]host[:port] or ~/.ssh/config aliases), "
              "taken round-robin; implies --provider ssh.")
    @argument("--trust-new-host", action="store_true", default=None,
              help="Accept and remember an unknown SSH host key (a changed key is always refused).")
    @argument("--image", metavar="IMAGE", help="Container image (marketplace providers only).")
    @argument("--python", metavar="PATH", help="Python on the instance (default python3; local: this kernel's).")
    @argument("--lease", type=int, metavar="SECONDS", help="Stop the job if this kernel is silent this long.")
    @argument("--retries", type=int, metavar="N", help="After a preemption, relaunch on the next offer up to N times.")
    @argument("--sync-every", type=int, metavar="SECONDS",
              help="Also bring rw mounts back this often while the job runs (a relaunch continues from them).")
    @argument("--max-results", metavar="SIZE", help="Most rw results brought back (default 20GB), e.g. 100GB.")
    @argument("--name", "-n", help="A name for the job in views and the ledger.")
    @argument("--sink", metavar="URL", help="Also store rw results in URL/<job id>/: a folder, s3://bucket/prefix "
              "or r2://bucket/prefix; {job_id} in URL places the id itself (IPython expands {name} in magic "
              "lines from the notebook's variables: if one is called job_id, write {{job_id}}).")
    @argument("--background", "-b", action="store_true",
              help="Return a Job handle at once; the view keeps updating.")
    @cell_magic
    def burst(self, line: str, cell: str) -> Any:
        """Run this cell on a rented GPU or your own machine, for a known, capped price.

        The cell's stdout and stderr stream into the notebook; a remote exception fails the cell with its
        traceback; ``burst.progress(pct)`` inside the cell drives the progress bar. Nothing is rented before
        every option has been checked, and the instance is always terminated at the end.

        Example::

            %%burst --max-cost 1 --mount ./data:data:ro --mount ./out:out:rw --push lr --pull loss
            loss = train(lr)
        """
        args = self.burst.parser.parse_args(_split_line(line))
        from .reconcile import announce  # not at %load_ext: it brings the agent's and asyncio's imports

        announce()  # what reconciliation at load or while jobs ran did since the last command, said once
        try:
            spec = self._spec(args, self.ip.transform_cell(cell))
            if args.dry_run:
                return self.session.dry_run(spec)
            job = self.session.submit(spec, namespace=self.ip.user_ns)
        except BurstError as exc:
            raise UsageError(str(exc)) from None
        return self._show(job, background=args.background)

    def _spec(self, args: Any, cell: str) -> JobSpec:
        from .spec import OPTIONS, JobSpec  # pydantic loads on the first cell, not at %load_ext

        fields: dict[str, Any] = {"cell": cell}

        def put(name: str, value: Any) -> None:
            if value is not None:
                fields[name] = value

        hosts = _names(args.host) or self.hosts
        # --offer names its provider; a configured default provider must not contradict it.
        put("provider", args.provider or ("ssh" if args.host else None) or (None if args.offer else self.provider))
        put("gpu_model", args.gpu)
        put("gpus", args.gpus)
        put("memory_gb", args.memory)
        put("max_cost_usd", _money(args.max_cost, "--max-cost") if args.max_cost is not None
            else _money(self.max_cost, "BurstMagics.max_cost"))
        put("max_price_usd_per_hour", _money(args.max_price, "--max-price"))
        put("max_duration_minutes", args.max_duration if args.max_duration is not None else self.max_duration)
        put("spot", args.spot)
        put("min_reliability", args.min_reliability)
        put("offer", args.offer)
        put("provision_timeout_seconds", args.provision_timeout)
        put("rate_usd_per_hour", _money(args.rate, "--rate") if args.rate is not None
            else _money(self.rate, "BurstMagics.rate"))
        put("mount_local", args.mount or None)
        put("push", _names(args.push) or None)
        put("pull", _names(args.pull) or None)
        put("ssh_hosts", hosts or None)
        put("ssh_trust_on_first_use", args.trust_new_host or self.trust_new_hosts)
        put("remote_python", args.python or self.remote_python)
        put("image", args.image)
        put("lease_seconds", args.lease if args.lease is not None else self.lease)
        put("retries", args.retries)
        put("sync_every_seconds", args.sync_every)
        put("max_results_bytes", args.max_results if args.max_results is not None else self.max_results)
        put("name", args.name)
        put("result_sink", args.sink)
        return JobSpec.build(OPTIONS, **fields)

    def _show(self, job: Job, *, background: bool) -> Any:
        from .display import CellDisplay
        from .variables import NO_RESULT

        try:
            display = CellDisplay(job, self.shell)
            if background:
                display.follow_in_background()
                return job  # shown as its view (Job._ipython_display_), so the cell's Out follows the job
            display.show()
        except BaseException:
            # The job is already submitted: never leave it running without a view or a handle.
            job.cancel()
            job.wait()
            raise
        result = display.run_blocking()
        self.ip.user_ns.update(result.values)  # on the main thread, after the run (even a failed one)
        if isinstance(result.error, RemoteError):
            raise result.error
        if result.error is not None:
            raise UsageError(f"job {job.id}: {result.error}")
        return None if result.result is NO_RESULT else result.result

    # -- %burst ---------------------------------------------------------------------------------------------

    @line_magic("burst")  # type: ignore[arg-type]  # IPython's stub cannot type a named line magic
    def burst_line(self, line: str) -> Any:
        """%burst ledger [day|provider|gpu|status] | budget [--daily USD] [--weekly USD] | jobs | down | cleanup
        [--dry-run] | offers [--gpu G] [--gpus N] [--max-price USD] [--provider P] [--min-reliability R] [--spot]
        | providers | help

        offers     live offers across the configured marketplaces: filters, sortable table, refresh, insert a cell
        providers  each marketplace: configured, reachable, lowest price for common GPUs
        ledger   the spend table (grouped when a key is given)
        budget   today's and this week's spend against the caps; --daily/--weekly set the caps ("none" clears)
        jobs     the jobs this kernel started
        down     hand every job of this kernel to a detached reaper (sync back, terminate, settle)
        cleanup  end what no live job owns: jobs of kernels that are gone, instances leaked at a marketplace
                 (--dry-run lists them with their $/h and cost so far)
        """
        words = shlex.split(line)
        command, rest = (words[0], words[1:]) if words else ("help", [])
        from . import api
        from .reconcile import announce

        announce()
        try:
            if command == "ledger":
                table = api.ledger()
                if not rest:
                    return table
                if rest[0] not in _GROUPS:
                    raise ConfigError(f"%burst ledger {rest[0]}: group by one of {', '.join(_GROUPS)}")
                return table.by(cast("GroupKey", rest[0]))
            if command == "budget":
                return self._budget(rest)
            if command == "jobs":
                return api.jobs()
            if command == "offers":
                o = _offers_parser().parse_args(rest)
                return api.offers(o.gpu, gpus=o.gpus, max_price=_money(o.max_price, "--max-price"), provider=o.provider,
                                  min_reliability=o.min_reliability, spot=o.spot)
            if command == "providers":
                return api.provider_status()
            if command == "down":
                handed = api.shutdown()
                print(f"burst: handed {len(handed)} job(s) to the reaper" + (f": {', '.join(handed)}" if handed
                                                                             else ""))
                return None
            if command == "cleanup":
                extra = [w for w in rest if w != "--dry-run"]
                if extra:
                    raise ConfigError(f"%burst cleanup: unknown option {extra[0]!r} (only --dry-run)")
                return api.cleanup(dry_run="--dry-run" in rest)
        except BurstError as exc:
            raise UsageError(str(exc)) from None
        if command in ("help", "-h", "--help"):
            print(self.burst_line.__doc__)
            return None
        raise UsageError(f"%burst {command}: unknown command; try offers, providers, ledger, budget, jobs, down, "
                         f"cleanup or help")

    def _budget(self, words: list[str]) -> Any:
        from . import api

        it = iter(words)
        for word in it:
            if word not in ("--daily", "--weekly"):
                raise ConfigError(f"%burst budget: unknown option {word!r} (use --daily USD / --weekly USD)")
            value = next(it, None)
            if value is None:
                raise ConfigError(f"%burst budget {word} needs an amount in USD (or none)")
            usd = None if value.lower() == "none" else value
            (api.set_daily_budget if word == "--daily" else api.set_weekly_budget)(usd=usd)
        return api.budget_bars()


def _offers_parser() -> Any:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # one UsageError line, not a SystemExit
            raise ConfigError(f"%burst offers: {message}")

    p = _Parser(prog="%burst offers", add_help=False)
    p.add_argument("--gpu")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--max-price")
    p.add_argument("--provider")
    p.add_argument("--min-reliability", type=float)
    p.add_argument("--spot", action="store_true")
    return p


def _money(value: object, what: str) -> Any:
    from .spec import parse_money

    return None if value is None else parse_money(value, what=what)
