"""How a provider declares itself: one :class:`ProviderDeclaration` in its ``<name>_declared.py`` module, named by
one line of the registry (``providers/__init__.py``).

A declaration is all the rest of the code knows of a provider before building it: its name, its account (the
variables and config table its key and URL come from), its GPU spellings, its capabilities, its preference among
equal prices, and how to build it. Nothing outside a provider's own modules keys on its name.

Declarations are read when the extension loads (is any marketplace configured?), so this module and every
``<name>_declared.py`` import nothing heavy: the provider's class (httpx, pydantic, the agent client) is imported
by ``build``, when a job or a reconciliation needs it.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import GpuSpellings

if TYPE_CHECKING:
    from ..config import Settings
    from ..connections import Connections
    from .accounts import Account
    from .base import Provider

__all__ = ["AccountSource", "Build", "BuildContext", "Capability", "ProviderConfig", "ProviderDeclaration",
           "from_account"]


class Capability(str, enum.Enum):
    """What a provider can do, declared once (its ``ProviderDeclaration``) and read from there or the built
    provider's ``capabilities``; never found out by its name or by probing for attributes."""

    #: A marketplace: an account, offers to browse, a per-job SSH key, and an instance that bills from its create
    #: request even if the job never starts. The others are the user's own machines: a job that never started
    #: costs nothing and leaves no row.
    RENTED = "rented"
    CUSTOM_IMAGE = "custom_image"  # runs a container image of the user's choice (--image)
    SPOT = "spot"  # interruptible capacity at a lower price
    PROTOTYPING = "prototyping"  # development capacity at a lower price, with limits its offers state
    STOP = "stop"  # can stop without destroying
    LABELS = "labels"  # instances carry our owner tag at the provider
    SELF_DESTRUCT = "self_destruct"  # the agent can end its own instance with provider-scoped means
    LOCAL_FILES = "local_files"  # the instance shares this machine's filesystem


@dataclass(frozen=True)
class ProviderConfig:
    """What it takes to build a provider again, in a kernel or in a reaper. JSON-able via ``to_json``."""

    name: str
    rate: Decimal = Decimal(0)
    hosts: tuple[str, ...] = ()
    trust_on_first_use: bool = False
    python: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rate": str(self.rate), "hosts": list(self.hosts),
                "trust_on_first_use": self.trust_on_first_use, "python": self.python}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProviderConfig:
        return cls(name=data["name"], rate=Decimal(data.get("rate") or 0), hosts=tuple(data.get("hosts") or ()),
                   trust_on_first_use=bool(data.get("trust_on_first_use")), python=data.get("python"))


@dataclass
class BuildContext:
    """What a build may use besides its :class:`ProviderConfig`: the connection pool, burst's home, the ssh
    round-robins that outlive one job, and the user's accounts (read once, when the first marketplace is built)."""

    connections: Connections
    home: Path
    rotations: dict[tuple[str, ...], itertools.count[int]] = field(default_factory=dict)
    settings: Settings | None = None

    def account(self, name: str) -> Account:
        """The account of marketplace ``name``, or one :class:`ConfigError` saying how to set its key."""
        from .accounts import require_account

        if self.settings is None:
            from ..config import load_settings

            self.settings = load_settings(project=False)  # accounts are the user's alone (config.PROJECT_RULES)
        return require_account(name, self.settings)


#: How a declaration builds its provider.
Build = Callable[[ProviderConfig, BuildContext], "Provider"]


@dataclass(frozen=True)
class AccountSource:
    """Where a marketplace account comes from: the variables its own CLI or SDK reads (they win), else its table
    in the user config file (``[NAME]``, read by config.py as ``Settings.accounts[NAME]``). The URL is the API
    root; the key is sent only where :func:`accounts.key_url_problem` allows."""

    key_var: str
    url_var: str
    default_url: str


@dataclass(frozen=True)
class ProviderDeclaration:
    """Everything about one provider that is not its API: see the module's docstring.

    ``preference`` ranks a marketplace's offers among offers of the same price (lower first; the default of
    ``prefer``). A :attr:`Capability.RENTED` provider has an account and a preference; the others have neither.
    """

    name: str
    build: Build
    capabilities: frozenset[Capability] = frozenset()
    account: AccountSource | None = None
    gpus: GpuSpellings = field(default_factory=lambda: GpuSpellings({}))  # none: local, ssh check nvidia-smi
    preference: int | None = None

    def __post_init__(self) -> None:
        # A name is typed after --provider and before ":" in --offer (OfferRef.parse), and names a config table.
        if not (self.name.isidentifier() and self.name == self.name.lower()):
            raise ValueError(f"provider name {self.name!r}: lower case letters, digits and _ only")
        if self.rented != (self.account is not None) or self.rented != (self.preference is not None):
            raise ValueError(f"provider {self.name}: a rented provider, and only one, has an account and a "
                             f"preference")

    @property
    def rented(self) -> bool:
        return Capability.RENTED in self.capabilities


def from_account(load: Callable[[], Callable[..., Provider]]) -> Build:
    """The build of a marketplace: its account (key, URL, SSH user) is looked up where it is built, and handed to
    the class ``load`` returns (``load`` imports it: a declaration is read at load, its client is not)."""

    def build(config: ProviderConfig, context: BuildContext) -> Provider:
        account = context.account(config.name)
        return load()(api_key=account.api_key, base_url=account.base_url, ssh_user=account.ssh_user)

    return build
