"""User defaults for ``%%burst`` and the Python API, read from TOML.

Lowest to highest precedence:

1. the defaults on :class:`Settings`;
2. the user file (``paths.user_config_path()``: ``$BURST_CONFIG`` or the platform's config dir), keys at the
   top level;
3. the ``[tool.burst]`` table of the nearest ``pyproject.toml`` that has one, walking up from the current
   directory (like mypy and ruff, a ``pyproject.toml`` without the table is passed over);
4. explicit options, applied with :meth:`Settings.merged`.

A project file comes with a cloned repository and is not trusted: :data:`PROJECT_RULES` says, key by key, what it
may do. It may shape jobs and tighten limits; it may never say where credentials, results or commands go, what is
trusted, or loosen a limit past the user's own value (the user file's, else the default).

A key set at a higher level replaces the lower value whole (``host`` lists are not concatenated). Keys are
spelled with hyphens, as the README writes them (``max-cost``), and a key that is a job option is spelled as the
option (``max-duration``, ``lease``, ``host``: options.py declares each once); the older spellings (``max_cost``,
``max-duration-minutes``, ``lease-seconds``, ``hosts``) are still read, so files written before stay valid. Every
problem is one :class:`ConfigError` line naming the file and the key as the file wrote it; keys an error lists
are in the README's spelling, and so is a suggestion unless an older spelling is the one close to what was
written.

Example:
    ``pyproject.toml``::

        [tool.burst]
        provider = "ssh"
        host = ["gpu1.lab", "gpu2.lab"]
        max-cost = 2.50

    >>> load_settings().max_cost  # doctest: +SKIP
    Decimal('2.5')
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator

from .config_files import PROJECT_TABLE
from .config_files import find_project_table as _find_project_table
from .config_files import read_toml as _read_toml
from .errors import ConfigError
from .options import DEFAULT_HELP, HARD_MAX_MINUTES, JOB_OPTIONS, LEASE_SECONDS, PROVISION_TIMEOUT_SECONDS
from .paths import user_config_path
from .providers import marketplaces, preference
from .spec import describe_validation, parse_money

if TYPE_CHECKING:
    from .budget import Cap

__all__ = ["PROJECT_RULES", "AccountSettings", "ProjectRule", "Settings", "budget_caps", "load_settings"]

#: The Settings field that holds every marketplace's account table (``[vast]`` in a file is ``accounts["vast"]``).
ACCOUNTS = "accounts"


class AccountSettings(BaseModel):
    """One marketplace account: the user file's table named as the provider (``[vast]``). The variables the
    provider declares (providers/declaration.py: ``VAST_API_KEY``, ``VAST_URL``) win over these."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True,
                              alias_generator=lambda name: name.replace("_", "-"))

    api_key: str | None = Field(default=None, repr=False, description="The account's API key or token.")
    url: str | None = Field(default=None, description="Base URL of the API (a proxy, a test server).")
    ssh_user: str | None = Field(default=None, description="Log in as this user instead of the provider's own.")


class Settings(BaseModel):
    """Defaults for every job. Strict: an unknown key or a value of the wrong type is an error, not a guess."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    provider: str = Field(default="auto", description=DEFAULT_HELP["provider"])
    max_cost: Decimal | None = Field(default=None, description=DEFAULT_HELP["max_cost"])
    max_duration_minutes: int | None = Field(default=None, ge=1, le=HARD_MAX_MINUTES,
                                             description=DEFAULT_HELP["max_duration_minutes"])
    rate: Decimal | None = Field(default=None, description=DEFAULT_HELP["rate"])
    hosts: list[str] = Field(default_factory=list, description=DEFAULT_HELP["hosts"])
    trust_new_hosts: bool = Field(default=False, description=DEFAULT_HELP["trust_new_hosts"])
    remote_python: str | None = Field(default=None, description=DEFAULT_HELP["remote_python"])
    lease_seconds: int = Field(default=LEASE_SECONDS, ge=0, description=DEFAULT_HELP["lease_seconds"])
    result_sink: str | None = Field(default=None, description=DEFAULT_HELP["result_sink"])
    daily_budget: Decimal | None = Field(default=None, description="All jobs' daily cap, for jobs under this file.")
    weekly_budget: Decimal | None = Field(default=None, description="All jobs' weekly cap, for jobs under this file.")
    image: str | None = Field(default=None, description=DEFAULT_HELP["image"])
    prefer: list[str] = Field(default_factory=preference,
                              description="Tie-break between equal prices: the more reliable provider first.")
    min_reliability: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                          description=DEFAULT_HELP["min_reliability"])
    offer_ttl_seconds: float = Field(default=30.0, ge=0, allow_inf_nan=False,
                                     description="How long searched offers are reused.")
    provision_timeout_seconds: float = Field(default=PROVISION_TIMEOUT_SECONDS, gt=0, allow_inf_nan=False,
                                             description=DEFAULT_HELP["provision_timeout_seconds"])
    reconcile_interval_seconds: float = Field(
        default=300.0, gt=0, allow_inf_nan=False,
        description="While jobs run, how often instances no live job owns are looked for "
        "at the providers and ended.")
    accounts: dict[str, AccountSettings] = Field(
        default_factory=dict, description="Marketplace accounts by provider, each a table of its name ([vast]).")

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("max_cost", "rate", "daily_budget", "weekly_budget", mode="before")
    @classmethod
    def _money(cls, value: object) -> Decimal | None:
        if value is None:
            return None
        try:
            return parse_money(value, what="amount")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator(ACCOUNTS)
    @classmethod
    def _declared_accounts(cls, value: dict[str, AccountSettings]) -> dict[str, AccountSettings]:
        unknown = [name for name in value if name not in _account_tables()]
        if unknown:
            raise ValueError(f"no marketplace is named {', '.join(unknown)} (known: {', '.join(_account_tables())})")
        return value

    @property
    def sources(self) -> dict[str, str]:
        """Where each value that is not a default came from: a file (with its table) or ``"override"``."""
        return dict(self._sources)

    def merged(self, **overrides: object) -> Settings:
        """A copy with every override that is not None applied, validated like a file (``%%burst`` options).

        Example:
            >>> Settings().merged(max_cost="1.5", hosts=None).max_cost
            Decimal('1.5')
        """
        given = _normalise({key: value for key, value in overrides.items() if value is not None}, label="override")
        values = self._explicit()
        if ACCOUNTS in given:
            given[ACCOUNTS] = values.get(ACCOUNTS, {}) | given[ACCOUNTS]  # one table replaces that account alone
        result = _checked(values | given, label="override")
        result._sources = self._sources | dict.fromkeys(given, "override")
        return result

    def _explicit(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.model_fields_set}


def load_settings(*, cwd: Path | None = None, user_file: Path | None = None, project: bool = True) -> Settings:
    """Merge the defaults, the user file and the nearest ``[tool.burst]``; missing files are skipped.

    ``cwd`` (default: the current directory) is where the walk up for ``pyproject.toml`` starts; ``user_file``
    defaults to ``paths.user_config_path()``. ``project=False`` reads the user file alone: ending instances (the
    reaper, cleanup) needs only the user's accounts, and works whatever the folder it runs in says. Raises
    :class:`ConfigError` for unreadable or invalid TOML, an unknown key, a bad value, or a project key that
    :data:`PROJECT_RULES` refuses.
    """
    user_path = user_config_path() if user_file is None else user_file
    users = Settings()  # the user's own values (else the defaults): what a project file may only tighten
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    user_table = _read_toml(user_path)
    if user_table is not None:
        # Validate each file on its own so that an error names the file it is in.
        users = _validate(user_table, label=str(user_path))
        values = users._explicit()
        sources = dict.fromkeys(values, str(user_path))
    found = _find_project_table((Path.cwd() if cwd is None else cwd).resolve()) if project else None
    if found is not None:
        label, table = found
        _refuse_account_tables(label, table, user_path)
        explicit = _validate(table, label=label)._explicit()
        for key, written in _written_names(table).items():
            PROJECT_RULES[key].check(f"{label} {written}", explicit[key], getattr(users, key), user_path)
        values |= explicit
        sources |= dict.fromkeys(explicit, label)
    settings = _checked(values, label="settings")
    settings._sources = sources
    return settings


def budget_caps(settings: Settings) -> list[Cap]:
    """``daily-budget`` and ``weekly-budget`` as caps for the jobs of the session that read them, each saying where
    it comes from. They are never stored: an edit holds from the next session on, and a project's cap stays in its
    folder (budget/caps.py: the lowest cap in force holds).
    """
    from .budget import Cap, Period

    caps = []
    fields: tuple[tuple[Period, str], ...] = (("day", "daily_budget"), ("week", "weekly_budget"))
    for period, field in fields:
        amount: Decimal | None = getattr(settings, field)
        if amount is None:
            continue
        source, key = settings.sources.get(field), _key(field)
        if source is None or source == "override":
            caps.append(Cap(period, amount, f"{key} given to this session", "this session's jobs"))
        elif source.endswith(PROJECT_TABLE):
            folder = Path(source.removesuffix(PROJECT_TABLE)).parent
            caps.append(Cap(period, amount, f"{key} in {source}", f"jobs started under {folder}"))
        else:
            caps.append(Cap(period, amount, f"{key} in {source}"))
    return caps


@dataclass(frozen=True)
class ProjectRule:
    """What a project file may do with one key. ``may``: ``shape`` (anything), ``lower`` or ``raise`` (only
    tighten against the user's value, compared through ``order``), ``never`` (only the user sets it: ``why``)."""

    may: Literal["shape", "lower", "raise", "never"]
    why: str = ""
    order: Callable[[Any], Any] = lambda value: value

    def check(self, where: str, value: Any, users: Any, user_path: Path) -> None:
        if self.may == "never":
            raise ConfigError(f"{where}: a project file cannot {self.why}; set it in {user_path} or as an option")
        if self.may == "shape":
            return
        looser = self.order(value) > self.order(users) if self.may == "lower" else \
            self.order(value) < self.order(users)
        if looser:
            raise ConfigError(f"{where}: a project file may only tighten this limit, and {_show(value)} is looser "
                              f"than {_show(users)} (yours or the default); change it in {user_path} or as an "
                              f"option")


def _none_is_unlimited(value: Any) -> Any:
    return math.inf if value is None else value


def _zero_is_never(value: Any) -> Any:
    return math.inf if value == 0 else value  # lease 0: no lease, the agent never stops a silent client's job


def _none_is_zero(value: Any) -> Any:
    return 0 if value is None else value


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


#: Every key of :class:`Settings`, and what a project's ``[tool.burst]`` may do with it (issue 9: a cloned
#: repository shapes jobs, never redirects credentials or loosens limits). A limit compares against the user's
#: value (the user file's, else the default): ``lower`` keys may only go down, ``raise`` keys only up.
PROJECT_RULES: dict[str, ProjectRule] = {
    "provider": ProjectRule("shape"),  # which of the user's own accounts or machines: its limits still hold
    "image": ProjectRule("shape"),
    "prefer": ProjectRule("shape"),
    "max_cost": ProjectRule("lower", order=_none_is_unlimited),
    "max_duration_minutes": ProjectRule("lower", order=_none_is_unlimited),
    "daily_budget": ProjectRule("lower", order=_none_is_unlimited),
    "weekly_budget": ProjectRule("lower", order=_none_is_unlimited),
    "lease_seconds": ProjectRule("lower", order=_zero_is_never),
    "provision_timeout_seconds": ProjectRule("lower"),  # the boot is billed
    "reconcile_interval_seconds": ProjectRule("lower"),  # a leak is looked for at least this often
    "offer_ttl_seconds": ProjectRule("lower"),  # an older price is a looser one
    "rate": ProjectRule("raise", order=_none_is_zero),  # a lower declared rate lets a cap buy more hours
    "min_reliability": ProjectRule("raise", order=_none_is_zero),
    "hosts": ProjectRule("never", "choose the machines your jobs and their keys go to"),
    "trust_new_hosts": ProjectRule("never", "decide which SSH host keys are trusted"),
    "remote_python": ProjectRule("never", "choose the command run on your machines"),
    "result_sink": ProjectRule("never", "choose where your results (and your storage credentials) are sent"),
    ACCOUNTS: ProjectRule("never", "hold account settings"),  # refused key by key first: _refuse_account_tables
}

#: Why each key of an account table belongs to the user (``[tool.burst.vast] url`` and the like).
_ACCOUNT_KEYS = {"api_key": "hold an API key", "url": "set where credentials go",
                 "ssh_user": "choose the user your account logs in as"}


def _refuse_account_tables(label: str, table: dict[str, Any], user_path: Path) -> None:
    """One line naming the first account setting in a project table, and where it belongs instead."""
    for declared in marketplaces():
        name, source = declared.name, declared.account
        account = table.get(name)
        if source is None or not isinstance(account, dict):
            continue
        env = {"api_key": source.key_var, "url": source.url_var}
        where = label.removesuffix("]") + f".{name}]"
        for written in account:
            key = str(written).replace("-", "_")
            why = _ACCOUNT_KEYS.get(key, "hold account settings")
            instead = f"{env[key]} or {written}" if key in env else str(written)
            raise ConfigError(f"{where} {written}: a project file cannot {why}; set {instead} in {user_path}")


#: A key that is a job option is spelled as the option (the README's spelling, issue 10 and 11), or as the Settings
#: field it fills, as files written before did (``lease-seconds``).
_AS_OPTION = {o.setting: o.key for o in JOB_OPTIONS if o.setting}
_FIELD_OF = {name: o.setting for o in JOB_OPTIONS if o.setting for name in o.spellings}


def _field(key: str) -> str:
    """The Settings field a key names, in any spelling a file may use (a marketplace's table: ``accounts``)."""
    name = str(key).replace("-", "_")
    if name == ACCOUNTS:
        return ""  # not a key of its own: a file writes each account as its provider's table
    if name in _account_tables():
        return ACCOUNTS
    return _FIELD_OF.get(name, name)


def _account_tables() -> list[str]:
    return [d.name for d in marketplaces()]


def _file_keys() -> list[str]:
    """Every key a file may write, as Settings fields and account tables."""
    return [name for field in Settings.model_fields for name in (_account_tables() if field == ACCOUNTS else [field])]


def _key(field: str) -> str:
    """A Settings field as the README spells its key."""
    return _AS_OPTION.get(field, field.replace("_", "-"))


def _written_names(table: dict[str, Any]) -> dict[str, str]:
    """Each Settings key of a (validated) table, as the file spells it."""
    return {_field(key): str(key) for key in table}


def _validate(table: dict[str, Any], *, label: str) -> Settings:
    return _checked(_normalise(table, label=label), label=label, written=_written_names(table))


def _checked(values: dict[str, Any], *, label: str, written: dict[str, str] | None = None) -> Settings:
    """Settings from values keyed by field (``_normalise``'s, or ``_explicit``'s)."""
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{label}: {describe_validation(exc, written or {})}") from None


def _normalise(table: dict[str, Any], *, label: str) -> dict[str, Any]:
    """Keys as Settings fields; an unknown key, or one setting given twice, is a :class:`ConfigError`."""
    values: dict[str, Any] = {}
    written: dict[str, str] = {}
    tables: dict[str, Any] = {}
    for key, value in table.items():
        name = _field(key)
        if name not in Settings.model_fields:
            raise ConfigError(f"{label}: unknown key {key!r}; {_suggest(key, as_field=label == 'override')}")
        if name == ACCOUNTS:
            tables[str(key)] = value
            continue
        if name in values:
            raise ConfigError(f"{label}: {written[name]} and {key} are the same setting; keep one")
        values[name], written[name] = value, key
    if tables:
        try:
            values[ACCOUNTS] = _ACCOUNT_TABLES.validate_python(tables)
        except ValidationError as exc:
            raise ConfigError(f"{label}: {describe_validation(exc, {})}") from None
    return values


#: Account tables keyed by their provider's name, each validated as the strict AccountSettings it is.
_ACCOUNT_TABLES = TypeAdapter(dict[str, AccountSettings])


def _suggest(key: str, *, as_field: bool) -> str:
    """The closest key in a file's spelling (or, ``as_field``, the keyword :meth:`Settings.merged` takes)."""
    known = [field if as_field else _key(field) for field in _file_keys()]
    if as_field:
        close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
    else:  # the README's spelling, else an older one close to what was typed (lease-secnds: lease-seconds)
        older = [name.replace("_", "-") for name in _FIELD_OF if name.replace("_", "-") not in known]
        typed = str(key).replace("_", "-")
        close = difflib.get_close_matches(typed, known, n=1) or difflib.get_close_matches(typed, older, n=1)
    return f"did you mean {close[0]}?" if close else "known keys: " + ", ".join(known)
