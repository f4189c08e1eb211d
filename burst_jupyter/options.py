"""Every job option, declared once: its flag, the JobSpec field it fills, how its text is read, the config key and
``%config BurstMagics`` trait that give its default, and its help.

From :data:`JOB_OPTIONS` come the ``%%burst`` line's parser, ``burst submit``'s, the offer search's (``%burst
offers`` and ``burst offers``), the traits of ``BurstMagics``, the Settings a config file fills a job from, the
spelling of a JobSpec field in an error (:data:`FLAGS`), and the help text. Stdlib only (and the provider
declarations, which are): ``%load_ext`` builds the cell magic's parser from it.

Example:
    >>> FLAGS["lease_seconds"], by_name("lease").setting
    ('--lease', 'lease_seconds')
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .providers import REGISTRY, offering
from .providers.declaration import Capability

__all__ = ["DEFAULT_HELP", "DEFAULT_MAX_RESULTS", "FLAGS", "HARD_MAX_MINUTES", "HELP", "IDLE_MINUTES", "JOB_OPTIONS",
           "LEASE_SECONDS", "MAX_GPUS", "OFFER_SEARCH", "PLACEMENT", "PROVISION_TIMEOUT_SECONDS", "Option",
           "add_options",
           "by_name", "for_line", "job_fields"]

#: No job runs longer than this, whatever it asks (architecture: "hard max 12 h").
HARD_MAX_MINUTES = 12 * 60
#: The most GPUs one job (or offer search) asks for: no marketplace rents more in one machine.
MAX_GPUS = 16
#: The built-in lease: the agent stops a job whose client has been silent this long (0: never).
LEASE_SECONDS = 600
#: What one job's results may bring back unless ``--max-results`` says more: bounds a hostile instance's flood.
DEFAULT_MAX_RESULTS = 20 * 10**9
#: The built-in limit on boot, image pull and SSH readiness of a rented machine.
PROVISION_TIMEOUT_SECONDS = 900.0

#: How an option's text becomes a value. ``money`` and ``size`` stay text here: JobSpec reads them (pydantic,
#: loaded with the first cell); ``names`` is a comma list; ``mounts`` repeats; ``body`` is what a job runs
#: (``burst submit`` reads it itself); ``flag`` takes no value.
Kind = Literal["text", "int", "float", "money", "size", "flag", "names", "mounts", "body"]
#: Which line takes an option: a notebook cell (``%%burst``), a terminal (``burst submit``), or a machine kept
#: across cells (``%burst up``).
Line = Literal["cell", "submit", "up"]
#: The default idle limit of a kept machine, minutes.
IDLE_MINUTES = 15.0

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float}


@dataclass(frozen=True)
class Option:
    """One job option, and its one name: ``--lease`` on a line, ``lease`` in a config file, ``BurstMagics.lease``
    in ``%config``. The Settings field's own name is its older spelling, which files and ``%config`` still take
    (giving both is an error). ``field`` is the JobSpec field it fills, None for an option about the run rather
    than the job (``--dry-run``). ``setting`` is the Settings field a job left without the option takes its value
    from; ``late``: the session applies that setting when it plans, not as the job's own value (an image only for
    a rented machine). ``trait``: a notebook may give its default with ``%config``."""

    name: str
    kind: Kind
    help: str
    field: str | None = None
    short: str | None = None
    also: tuple[str, ...] = ()  # more flags for the same value (the seed's --gpu-model, --max-cost-usd)
    metavar: str | None = None
    setting: str | None = None
    late: bool = False
    trait: bool = False
    lines: tuple[Line, ...] = ("cell", "submit", "up")
    # Where the machine is and what it is: a cell that gives one rents a machine of its own, never the kept one.
    placement: bool = False

    @property
    def key(self) -> str:
        """Its config key, as the README spells it."""
        return self.name.replace("_", "-")

    @property
    def spellings(self) -> tuple[str, ...]:
        """Its name, then the older one a file or ``%config`` may still use (``lease_seconds``, ``hosts``)."""
        return (self.name, *(() if self.setting in (None, self.name) else (self.setting,)))

    @property
    def flag(self) -> str:
        return "--" + self.key

    @property
    def default_help(self) -> str:
        """What its config key and its ``%config`` trait hold."""
        return f"Default for {self.flag}: {self.help.replace('%%', '%')}"

    def argument(self, **overrides: Any) -> tuple[list[str], dict[str, Any]]:
        """This option as ``add_argument``'s arguments (a parser's, or IPython's ``magic_arguments.argument``)."""
        flags = [self.flag, *self.also, *([self.short] if self.short else [])]
        kwargs: dict[str, Any] = {"dest": self.name, "help": self.help}
        if self.kind == "flag":
            kwargs.update(action="store_true", default=None if self.field else False)
        else:
            kwargs.update(metavar=self.metavar, type=_TYPES.get(self.kind))
            if self.kind == "mounts":
                kwargs.update(action="append", default=[])
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "default"}
        return flags, kwargs | overrides


JOB_OPTIONS: tuple[Option, ...] = (
    Option("provider", "text", "Where to run: auto (default: the cheapest configured marketplace for a --gpu job, "
           f"else your --host boxes, else this machine), {', '.join(REGISTRY)}.", field="provider",
           short="-p", setting="provider", trait=True, placement=True),
    Option("gpu", "text", "GPU model: RTX_4090, H100, A100_80GB, ANY ... (default: no GPU required).",
           field="gpu_model", also=("--gpu-model",), placement=True),
    Option("gpus", "int", f"Number of GPUs, 1 to {MAX_GPUS} (default 1).", field="gpus", metavar="N", placement=True),
    Option("memory", "int", "Minimum GPU memory per GPU, GB.", field="memory_gb", metavar="GB", placement=True),
    Option("max_cost", "money", "Hard cap on this job's bill, USD.", field="max_cost_usd", also=("--max-cost-usd",),
           metavar="USD", setting="max_cost", trait=True),
    Option("max_price", "money", "Ceiling on the hourly price of the machine.", field="max_price_usd_per_hour",
           metavar="USD_PER_HOUR", placement=True),
    Option("max_duration", "int", f"Stop the job after this many minutes (at most {HARD_MAX_MINUTES}).",
           field="max_duration_minutes", metavar="MINUTES", setting="max_duration_minutes", trait=True),
    Option("spot", "flag", f"Rent interruptible capacity (cheaper, may be preempted): {offering(Capability.SPOT)}.",
           field="spot", placement=True),
    Option("prototyping", "flag", "Also rent development capacity, cheaper with limits its offers state (Thunder's "
           "prototyping mode: CUDA-level virtualisation; long-running GPU processes may be interrupted): "
           f"{offering(Capability.PROTOTYPING)}. --offer naming such an offer allows it.", field="prototyping",
           placement=True),
    Option("min_reliability", "float", "Skip offers the provider scores below this.", field="min_reliability",
           metavar="0..1", setting="min_reliability", placement=True),
    Option("offer", "text", "Rent exactly this offer (from the offer browser: %%burst offers, burst offers).",
           field="offer", metavar="PROVIDER:ID", placement=True),
    Option("provision_timeout", "float", "One limit on boot, image pull and SSH readiness of a rented machine "
           f"(default {PROVISION_TIMEOUT_SECONDS:.0f}).", field="provision_timeout_seconds", metavar="SECONDS",
           setting="provision_timeout_seconds", late=True, placement=True),
    Option("dry_run", "flag", "Show the offer it would rent and the worst-case cost; rent nothing.",
           lines=("cell", "submit")),
    Option("rate", "money", "Declared $/h for local and ssh machines (default 0).", field="rate_usd_per_hour",
           metavar="USD_PER_HOUR", setting="rate", trait=True, placement=True),
    Option("mount", "mounts", "Upload a folder (ro), or upload it and sync it back after the run (rw). Repeatable.",
           field="mount_local", short="-m", metavar="LOCAL:REMOTE[:ro|:rw]"),
    Option("push", "names", "Notebook variables to send to the cell.", field="push", metavar="A,B", lines=("cell",)),
    Option("pull", "names", "Variables to bring back into the notebook after the run.", field="pull", metavar="C,D",
           lines=("cell",)),
    Option("host", "names", "SSH hosts ([user@]host[:port] or ~/.ssh/config aliases), taken round-robin; implies "
           "--provider ssh.", field="ssh_hosts", metavar="H1,H2", setting="hosts", trait=True, placement=True),
    Option("trust_new_host", "flag", "Accept and remember an unknown SSH host key (a changed key is always "
           "refused).", field="ssh_trust_on_first_use", setting="trust_new_hosts", trait=True, placement=True),
    Option("image", "text", "Container image (marketplace providers only).", field="image", metavar="IMAGE",
           setting="image", late=True, placement=True),
    Option("python", "text", "Python on the instance (default python3; local: this kernel's).",
           field="remote_python", metavar="PATH", setting="remote_python", trait=True, placement=True),
    Option("lease", "int", f"Stop the job if this kernel or process is silent this long (default {LEASE_SECONDS}; "
           "0: never).", field="lease_seconds", metavar="SECONDS", setting="lease_seconds", trait=True),
    Option("retries", "int", "After a preemption, relaunch on the next offer up to N times.", field="retries",
           metavar="N", lines=("cell", "submit")),
    Option("sync_every", "int", "Also bring rw mounts back this often while the job runs (a relaunch continues "
           "from them).", field="sync_every_seconds", metavar="SECONDS", lines=("cell", "submit")),
    Option("max_results", "size", f"Most rw results brought back (default {DEFAULT_MAX_RESULTS // 10**9}GB), e.g. "
           "100GB; past it the transfer stops and the job fails saying what was left out.",
           field="max_results_bytes", metavar="SIZE", trait=True),
    Option("name", "text", "A name for the job in views and the ledger.", field="name", short="-n"),
    Option("sink", "text", "Also store rw results in URL/<job id>/: a folder, s3://bucket/prefix or "
           "r2://bucket/prefix; {job_id} in URL places the id itself (IPython expands {name} in magic lines from "
           "the notebook's variables: if one is called job_id, write {{job_id}}).", field="result_sink",
           metavar="URL", setting="result_sink",
           lines=("cell", "submit")),
    Option("background", "flag", "Return a Job handle at once; the view keeps updating.", short="-b",
           lines=("cell",)),
    Option("file", "body", "A Python file to run like a notebook cell.", field="cell_file", short="-f",
           metavar="FILE.py", lines=("submit",)),
    Option("idle", "float", f"Bring the machine down after this many minutes without a cell (default "
           f"{IDLE_MINUTES:.0f}); its agent does so with this kernel gone too.", field="idle_minutes",
           metavar="MINUTES", lines=("up",)),
    Option("on", "text", "Run this cell on the kept machine of this name (%%burst up --name; %%burst machines "
           "lists them).", field="on_machine", metavar="NAME", lines=("cell",)),
    Option("command", "body", "A command line, split as a shell would (or give -- PROGRAM ARGS at the end).",
           field="command", short="-c", metavar='"PROGRAM ARGS"', lines=("submit",)),
)

#: Each JobSpec field as the user types it on a ``%%burst`` or ``burst submit`` line (issue 10: an error names
#: the option, never the field behind it).
FLAGS: dict[str, str] = {o.field: o.flag for o in JOB_OPTIONS if o.field is not None}

#: Each JobSpec field's description: its option's help.
HELP: dict[str, str] = {o.field: o.help.replace("%%", "%") for o in JOB_OPTIONS if o.field is not None}

#: Each Settings field an option's default comes from, and its description.
DEFAULT_HELP: dict[str, str] = {o.setting: o.default_help for o in JOB_OPTIONS if o.setting is not None}

#: The options an offer search takes (``%burst offers``, ``burst offers``), with their defaults there.
OFFER_SEARCH: dict[str, Any] = {"gpu": None, "gpus": 1, "max_price": None, "provider": None,
                                "min_reliability": None, "spot": False, "prototyping": False}


#: The options that say where a job runs and on what: a ``%%burst`` cell that gives one rents its own machine.
PLACEMENT: frozenset[str] = frozenset(o.field for o in JOB_OPTIONS if o.placement and o.field)


def by_name(name: str) -> Option:
    return next(o for o in JOB_OPTIONS if o.name == name)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option], **defaults: Any) -> None:
    """Add ``options`` to ``parser`` in the table's order, each with its default in ``defaults`` if given."""
    for option in options:
        flags, kwargs = option.argument(**({"default": defaults[option.name]} if option.name in defaults else {}))
        parser.add_argument(*flags, **kwargs)


def for_line(line: Line) -> list[Option]:
    return [o for o in JOB_OPTIONS if line in o.lines]


def job_fields(args: argparse.Namespace, line: Line,
               fallback: Mapping[str, tuple[Any, str]] | None = None) -> dict[str, Any]:
    """The JobSpec fields a parsed line gives (the body aside: ``burst submit`` reads it). An option left out takes
    ``fallback[name]``, a value and how an error names it (``BurstMagics.max_cost``); money is read here so that
    an error names the option as typed."""
    from .spec import parse_money  # pydantic loads with the first job, not at %load_ext

    fallback = fallback or {}
    fields: dict[str, Any] = {}
    for option in for_line(line):
        if option.field is None or option.kind == "body":
            continue
        value, what = getattr(args, option.name), option.flag
        if option.kind == "names" and value is not None:
            value = [n.strip() for n in value.split(",") if n.strip()]
        if value in (None, []):  # left out (an empty list is no list: `--host ,` is no host)
            value, what = fallback.get(option.name, (None, ""))
        if option.kind == "money" and value is not None:
            value = parse_money(value, what=what)
        if value not in (None, []):
            fields[option.field] = value
    if args.host and not args.provider:
        fields["provider"] = "ssh"  # --host names ssh boxes
    elif args.offer and not args.provider:
        fields.pop("provider", None)  # --offer names its provider: a default must not contradict it
    return fields
