"""JobSpec: what a user asks for. Strict in (``extra="forbid"``); every check here runs before anything is rented.

Example:
    >>> spec = JobSpec(name="sweep", cell="print(1)", max_cost_usd=1,
    ...                mount_local=[("./configs", "/data/configs:ro")])
    >>> spec.mounts[0].mode
    'ro'
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ConfigError
from .options import DEFAULT_MAX_RESULTS, HARD_MAX_MINUTES, HELP, LEASE_SECONDS, MAX_GPUS

__all__ = [
    "DEFAULT_MAX_RESULTS",
    "HARD_MAX_MINUTES",
    "MAX_GPUS",
    "JobSpec",
    "Mount",
    "describe_validation",
    "gpus_problem",
    "parse_money",
    "parse_mount",
    "parse_size",
]

#: ``C:\\...`` or ``C:/...``: a Windows drive, whose colon is not the LOCAL:REMOTE separator.
_DRIVE_RE = re.compile(r"^[A-Za-z]:[\\/]")

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*$")
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: object, *, what: str = "size") -> int:
    """A number of bytes: an int, or text like ``500MB``, ``20GB``, ``1.5T`` (decimal units, as disks count)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        if match is None or isinstance(value, bool):
            raise ConfigError(f"{what} must be a size like 500MB or 20GB, not {value!r}")
        size = int(Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise ConfigError(f"{what} must be at least 1 byte (got {value!r})")
    return size


def parse_money(value: object, *, what: str = "cost") -> Decimal:
    """A non-negative, finite amount of USD as ``Decimal``. Floats go through ``str`` (10.1 stays 10.1)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number of USD, not {value!r}")
    try:
        amount = Decimal(str(value).strip().lstrip("$")) if isinstance(value, (str, float)) else Decimal(value)  # type: ignore[arg-type]
    except (InvalidOperation, TypeError, ValueError):
        raise ConfigError(f"{what} must be a number of USD, not {value!r}") from None
    if not amount.is_finite():
        raise ConfigError(f"{what} must be a finite number of USD, not {value!r}")
    if amount < 0:
        raise ConfigError(f"{what} cannot be negative (got {amount})")
    if amount.adjusted() >= 12:  # past a trillion: a typo, and beyond what the ledger and views can show
        raise ConfigError(f"{what} is too large: {value!r} (under $1,000,000,000,000)")
    return amount


class Mount(BaseModel):
    """A local folder placed at ``remote`` on the instance. ``ro``: uploaded. ``rw``: uploaded and synced back.

    ``remote`` is absolute (used as is on the machine the cell runs on), starts with ``~`` (the remote home) or
    is relative (inside the job's working directory, which is the cell's current directory).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    local: Path
    remote: str
    mode: Literal["ro", "rw"] = "ro"

    @field_validator("remote")
    @classmethod
    def _remote_ok(cls, v: str) -> str:
        v = v.strip()
        if not v or v in {"/", "~", "."}:
            raise ValueError(f"remote path {v!r} would cover the whole machine; name a folder")
        if ".." in Path(v).parts:
            raise ValueError(f"remote path {v!r} may not contain '..'")
        return v.rstrip("/")

    def __str__(self) -> str:
        return f"{self.local}:{self.remote}:{self.mode}"


def gpus_problem(gpus: int) -> str | None:
    """What is wrong with a GPU count a job or an offer search asks for, or None: 1 to :data:`MAX_GPUS`. 0 is
    not "no GPU" (every provider would rent one): a job that needs none leaves out ``--gpu``."""
    if 1 <= gpus <= MAX_GPUS:
        return None
    return f"must be 1 to {MAX_GPUS}, not {gpus} (a job that needs no GPU leaves out --gpu and --gpus)"


def parse_mount(text: str | tuple[Any, ...] | Mount) -> Mount:
    """``LOCAL:REMOTE[:ro|:rw]`` or the seed's tuple form ``("./configs", "/data/configs:ro")``. On Windows, LOCAL
    may start with a drive (``C:\\data:data:rw``); elsewhere such a path is refused, never read as a folder
    ``C``."""
    if isinstance(text, Mount):
        return text
    if isinstance(text, tuple):
        if len(text) != 2:
            raise ConfigError(f"mount {text!r} must be (local, 'remote[:ro|:rw]')")
        local, rest = str(text[0]), str(text[1])
    else:
        drive = 2 if _DRIVE_RE.match(str(text)) else 0
        local, sep, rest = str(text)[drive:].partition(":")
        local = str(text)[:drive] + local
        if not sep:
            raise ConfigError(f"mount {text!r} must look like LOCAL:REMOTE[:ro|:rw], e.g. ./data:/work/data:ro")
    if _DRIVE_RE.match(local) and os.name != "nt":
        raise ConfigError(f"mount {text!r}: {local} is a Windows path and this machine is not Windows; name the "
                          f"folder as this machine sees it (for example /mnt/c/... under WSL)")
    mode = "ro"
    remote = rest
    if rest.endswith((":ro", ":rw")):
        remote, mode = rest[:-3], rest[-2:]
    elif ":" in rest:
        raise ConfigError(f"mount {text!r}: mode must be ro or rw, not {rest.rsplit(':', 1)[1]!r}")
    if not local or not remote:
        raise ConfigError(f"mount {text!r} must look like LOCAL:REMOTE[:ro|:rw], e.g. ./data:/work/data:ro")
    try:
        return Mount(local=Path(local).expanduser(), remote=remote, mode=mode)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise ConfigError(f"mount {text!r}: {_first_error(exc)}") from None


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", exc)).removeprefix("Value error, ")
    return str(exc)


class JobSpec(BaseModel):
    """One job: a notebook cell (``cell``) or a command (``command``), where it runs, and what it may cost.

    The fields follow the cloud-burst worker spec (seeds/000): name, image, gpus, gpu_model, memory_gb,
    max_duration_minutes, max_cost_usd, command or cell source, mount_local, provider, ssh_hosts, result_sink.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field("job", description=HELP["name"])
    cell: str | None = Field(None, description="Python source to run remotely (exactly one of cell/command).")
    cell_file: str | None = Field(None, description=HELP["cell_file"])
    command: list[str] | None = Field(None, description=HELP["command"])
    image: str | None = Field(None, description=HELP["image"])
    gpus: int = Field(1, description=HELP["gpus"])
    gpu_model: str | None = Field(None, description=HELP["gpu_model"])
    memory_gb: int | None = Field(None, ge=1, description=HELP["memory_gb"])
    max_duration_minutes: int | None = Field(None, ge=1, le=HARD_MAX_MINUTES, description=HELP["max_duration_minutes"])
    max_cost_usd: Decimal | None = Field(None, description=HELP["max_cost_usd"])
    max_price_usd_per_hour: Decimal | None = Field(None, description=HELP["max_price_usd_per_hour"])
    rate_usd_per_hour: Decimal | None = Field(None, description=HELP["rate_usd_per_hour"])
    mount_local: list[Mount] = Field(default_factory=list, description=HELP["mount_local"])
    push: list[str] = Field(default_factory=list, description=HELP["push"])
    pull: list[str] = Field(default_factory=list, description=HELP["pull"])
    provider: str = Field("auto", description=HELP["provider"])
    spot: bool = Field(False, description=HELP["spot"])
    prototyping: bool = Field(False, description=HELP["prototyping"])
    min_reliability: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description=HELP["min_reliability"])
    offer: str | None = Field(None, description=HELP["offer"])
    provision_timeout_seconds: float | None = Field(None, gt=0, allow_inf_nan=False,
                                                    description=HELP["provision_timeout_seconds"])
    ssh_hosts: list[str] = Field(default_factory=list, description=HELP["ssh_hosts"])
    ssh_trust_on_first_use: bool = Field(False, description=HELP["ssh_trust_on_first_use"])
    remote_python: str | None = Field(None, description=HELP["remote_python"])
    lease_seconds: int = Field(LEASE_SECONDS, ge=0, description=HELP["lease_seconds"])
    retries: int = Field(0, ge=0, le=10, description=HELP["retries"])
    sync_every_seconds: int | None = Field(None, ge=5, description=HELP["sync_every_seconds"])
    result_sink: str | None = Field(None, description=HELP["result_sink"])
    max_results_bytes: int = Field(DEFAULT_MAX_RESULTS, description=HELP["max_results_bytes"])
    idle_minutes: float | None = Field(None, gt=0, le=HARD_MAX_MINUTES, allow_inf_nan=False,
                                       description=HELP["idle_minutes"])
    on_machine: str | None = Field(None, description=HELP["on_machine"])

    @field_validator("max_results_bytes", mode="before")
    @classmethod
    def _size(cls, v: object) -> int:
        try:
            return parse_size(v, what="the limit")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("max_cost_usd", "max_price_usd_per_hour", "rate_usd_per_hour", mode="before")
    @classmethod
    def _money(cls, v: object, info: Any) -> Decimal | None:
        if v is None:
            return None
        try:
            return parse_money(v, what="amount")  # the error's place names the field (or its option)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("offer")
    @classmethod
    def _offer(cls, v: str | None) -> str | None:
        from .providers.base import OfferRef

        return None if v is None else str(OfferRef.parse(v))  # one word, however it was pasted

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: int) -> int:
        problem = gpus_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("mount_local", mode="before")
    @classmethod
    def _mounts(cls, v: object) -> list[Mount]:
        if not isinstance(v, (list, tuple)):
            raise ValueError("mount_local must be a list of mounts")
        try:
            return [parse_mount(m) for m in v]
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("push", "pull")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a Python variable name")
        return v

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("command must name a program")
        return v

    @model_validator(mode="after")
    def _one_body(self) -> JobSpec:
        if self.kept:
            if self.cell is not None or self.command is not None or self.push or self.pull:
                raise ValueError("a kept machine (%burst up) runs no cell of its own: send cells to it")
        elif (self.cell is None) == (self.command is None):
            raise ValueError("give exactly one of cell= or command=")
        if self.command is not None and (self.push or self.pull):
            raise ValueError("push/pull need a cell, not a command")
        remotes = [m.remote for m in self.mount_local]
        if len(set(remotes)) != len(remotes):
            raise ValueError(f"two mounts share a remote path: {remotes}")
        return self

    @property
    def kept(self) -> bool:
        """A machine kept across cells (``%burst up``): its job is the machine's Python process, not a cell."""
        return self.idle_minutes is not None

    @property
    def mounts(self) -> list[Mount]:
        return self.mount_local

    @classmethod
    def build(cls, named: Mapping[str, str] | None = None, /, **fields: Any) -> JobSpec:
        """Like ``JobSpec(...)`` but raises one :class:`ConfigError` line instead of a ValidationError, naming a
        field as ``named`` says (:data:`~burst_jupyter.options.FLAGS`: as typed on a ``%%burst`` or ``burst submit``
        line)."""
        try:
            return cls(**fields)
        except ValueError as exc:
            raise ConfigError(describe_validation(exc, named or {})) from None


#: pydantic's bound checks, said the way the other checks say them.
_BOUNDS = {"greater_than_equal": "must be at least {ge}", "less_than_equal": "must be at most {le}",
           "greater_than": "must be more than {gt}", "less_than": "must be less than {lt}"}


def describe_validation(exc: Exception, named: Mapping[str, str]) -> str:
    """A pydantic ValidationError as one line: ``PLACE: what is wrong (got VALUE)``, the place's first part
    spelled as ``named`` says (an option, a config key as the file wrote it), else as the field is named."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    first = errors()[0]
    loc = list(first.get("loc", ()))
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{named.get(str(part), part)}" if i == 0 else
                    f".{part}" for i, part in enumerate(loc)).lstrip(".")
    kind = str(first.get("type", ""))
    if kind == "extra_forbidden":
        msg = "unknown field"
    elif kind in _BOUNDS:
        bounds = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in first.get("ctx", {}).items()}
        msg = f"{_BOUNDS[kind].format(**bounds)} (got {first.get('input')!r})"
    elif kind == "value_error":  # our own validators already quote the value
        msg = str(first.get("msg", "")).removeprefix("Value error, ")
    else:
        msg = f"{first.get('msg', '')} (got {first.get('input')!r})"
    return f"{where}: {msg}" if where else msg
